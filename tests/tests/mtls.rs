//! Mutual TLS on the controller stream, with the real binaries: `lb-controller
//! --config` and `lb-agent --controller https://...` in a netns lab (both on
//! the node namespace's loopback), certificates from `lb_api::tls::certs`
//! (what `lb-controller certs` writes), and impostor clients made in the
//! test. docs/security.md says what each control covers.
//!
//! - impostors (another node's certificate, another CA, no certificate, a
//!   made-up node) are refused and counted, and never touch the real node's
//!   status, metrics or traffic;
//! - `https://` against a plaintext controller fails with a clear error, and
//!   plaintext without `--insecure` is refused on both sides;
//! - rotated certificate files are used without a restart and no flow is
//!   lost; an agent reconnects before its certificate expires.
//!
//! Needs root (the lab); without it each test prints SKIP and passes (fails under CI).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lb_api::tls::certs::{Bundle, Validity};
use lb_api::tls::client::TlsConnector;
use lb_api::tls::rustls;
use lb_api::tls::rustls::pki_types::ServerName;
use lb_api::tls::{Material, TlsPaths, client_config};
use lb_api::wire::{StateStreamClient, pb};
use rpclb_tests::lab::{self, HeldConn, Lab, Limits};
use rpclb_tests::procs::{
    Proc, Scrape, TestDir, agent_args, agent_bin, agent_tls_args, controller_bin,
    controller_tls_args, http_get_port, wait_until,
};
use rpclb_tests::skip_unless_lab;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const GRPC: u16 = 50551;
const CTL_METRICS: u16 = 9465;

fn config(lab: &Lab, backends: &[usize]) -> String {
    let mut s = String::from(
        "services:\n  - name: lab/web:http\n    vip: 10.96.0.10\n    port: 80\n    \
         algorithm: round-robin\n    backends:\n",
    );
    for &i in backends {
        s.push_str(&format!(
            "      - {{ ip: {}, port: 8080 }}\n",
            lab.backend(i).ip()
        ));
    }
    s
}

/// `lb-controller --config` in the node namespace with `extra` flags (TLS or --insecure).
fn controller(lab: &Lab, dir: &TestDir, name: &str, extra: &[String]) -> Proc {
    let mut args: Vec<String> = [
        "--config",
        &dir.config().display().to_string(),
        "--listen",
        &format!("127.0.0.1:{GRPC}"),
        "--metrics-addr",
        &format!("127.0.0.1:{CTL_METRICS}"),
        "--config-poll-ms",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let mut c = Proc::spawn(lab, dir, name, controller_bin(), &args);
    wait_until("the controller's /readyz", Duration::from_secs(30), || {
        c.check_alive();
        matches!(
            http_get_port(c.node.as_deref(), CTL_METRICS, "/readyz"),
            Ok((200, _))
        )
    });
    c
}

fn scrape_controller(c: &mut Proc) -> Scrape {
    c.check_alive();
    let (status, body) = http_get_port(c.node.as_deref(), CTL_METRICS, "/metrics")
        .unwrap_or_else(|e| panic!("controller /metrics: {e}\n{}", c.log()));
    assert_eq!(status, 200, "{body}");
    Scrape(body)
}

/// `lb-agent --controller URL --node-name node-a` with `extra` flags.
fn agent(lab: &Lab, dir: &TestDir, name: &str, url: &str, extra: &[String]) -> Proc {
    let mut a = agent_args(lab, dir, &[]);
    let i = a.iter().position(|x| x == "--config").expect("--config");
    a.drain(i..i + 2);
    a.extend(["--controller", url, "--node-name", "node-a"].map(String::from));
    a.extend(extra.iter().cloned());
    Proc::start(lab, dir, name, &a)
}

fn https() -> String {
    format!("https://127.0.0.1:{GRPC}")
}

/// The backends (by name) `n` new connections through the VIP reach.
fn reached(lab: &Lab, n: usize) -> std::collections::BTreeSet<String> {
    lab.client_tcp(SocketAddrV4::new(VIP, 80), n)
        .expect("TCP through the VIP")
        .into_iter()
        .map(|r| r.backend)
        .collect()
}

fn client_cfg(p: &TlsPaths) -> rustls::ClientConfig {
    client_config(&Material::read(p).expect("TLS files"), None).expect("client config")
}

fn connector(cfg: rustls::ClientConfig) -> TlsConnector {
    TlsConnector::new(Arc::new(cfg), ServerName::try_from("127.0.0.1").unwrap())
}

/// One Watch from inside the node namespace with `cfg`, saying Hello{node}
/// then acking version 1 with an error: the controller's answer, or the
/// connection's error.
fn impostor(lab: &Lab, cfg: rustls::ClientConfig, node: &str) -> Result<(), String> {
    let node = node.to_string();
    lab.node()
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let ch =
                    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{GRPC}"))
                        .unwrap()
                        .origin(https().parse().unwrap())
                        .connect_timeout(Duration::from_secs(5))
                        .connect_with_connector(connector(cfg))
                        .await
                        .map_err(|e| format!("connect: {e:?}"))?;
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tx.send(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                        node,
                        agent_version: "impostor".into(),
                        applied_version: 0,
                    })),
                })
                .await
                .unwrap();
                tx.send(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
                        version: 1,
                        error: "impostor says the apply failed".into(),
                        refused: Vec::new(),
                    })),
                })
                .await
                .unwrap();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    StateStreamClient::new(ch)
                        .watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
                )
                .await
                .map_err(|_| "no answer in 10 s".to_string())?;
                match r {
                    Ok(mut s) => {
                        // Held open a moment, as an impostor would.
                        let m = s.get_mut().message().await;
                        Err(format!("accepted: {m:?}"))
                    }
                    Err(st) => Err(format!("{:?}: {}", st.code(), st.message())),
                }
            })
        })
        .expect("node namespace")
}

/// The serial of the certificate the controller serves a new connection.
fn served_serial(lab: &Lab, cfg: rustls::ClientConfig) -> String {
    lab.node()
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tls = connector(cfg)
                    .connect("127.0.0.1", GRPC)
                    .await
                    .expect("TLS to the controller");
                let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
                lb_api::tls::LeafInfo::parse(leaf).unwrap().serial
            })
        })
        .expect("node namespace")
}

/// Another node's certificate, another CA, no certificate, a made-up node: each
/// refused and counted by reason; node-a's agent, status, metrics and traffic
/// stay as they were.
#[test]
fn impostors_are_refused_and_touch_nothing() {
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("mtls-impostor");
    let certs = dir.certs(&["node-a", "node-b"]);
    let other = Bundle::write(
        &dir.path().join("other"),
        &["node-a"],
        &[],
        Validity::days(1),
    )
    .unwrap();
    dir.write_config(&config(&lab, &[1, 2]));
    let mut ctl = controller(&lab, &dir, "controller", &controller_tls_args(&certs));
    let mut a = agent(
        &lab,
        &dir,
        "agent",
        &https(),
        &agent_tls_args(&certs, "node-a"),
    );
    a.wait_ready();
    wait_until("node-a's ack", Duration::from_secs(10), || {
        let m = scrape_controller(&mut ctl);
        let published = m.get("rpclb_controller_published_version", &[]);
        published.is_some()
            && m.get(
                "rpclb_controller_agent_acked_version",
                &[("node", "node-a")],
            ) == published
    });
    assert!(
        a.log().contains("presenting this node's certificate"),
        "{}",
        a.log()
    );

    // node-b's certificate, watching (and acking for) node-a.
    let r = impostor(&lab, client_cfg(&certs.node_paths("node-b")), "node-a");
    let e = r.unwrap_err();
    assert!(e.starts_with("PermissionDenied"), "{e}");
    assert!(e.contains("\"node-b\"") && e.contains("\"node-a\""), "{e}");
    // A made-up node with node-b's certificate.
    let e = impostor(&lab, client_cfg(&certs.node_paths("node-b")), "made-up-7").unwrap_err();
    assert!(e.starts_with("PermissionDenied"), "{e}");
    // node-a's name on a certificate from another CA.
    let mut p = other.node_paths("node-a");
    p.ca = certs.ca();
    let e = impostor(&lab, client_cfg(&p), "node-a").unwrap_err();
    assert!(!e.starts_with("accepted"), "{e}");
    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            Material::read(&certs.node_paths("node-a"))
                .unwrap()
                .ca
                .remove(0),
        )
        .unwrap();
    let mut none = rustls::ClientConfig::builder_with_provider(lb_api::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    none.alpn_protocols = vec![b"h2".to_vec()];
    let e = impostor(&lab, none, "node-a").unwrap_err();
    assert!(!e.starts_with("accepted"), "{e}");

    wait_until(
        "the handshake refusals to be counted",
        Duration::from_secs(5),
        || {
            scrape_controller(&mut ctl).get(
                "rpclb_controller_stream_refusals_total",
                &[("reason", "tls_handshake")],
            ) >= Some(2.0)
        },
    );
    let m = scrape_controller(&mut ctl);
    let refused = |reason: &str| {
        m.get(
            "rpclb_controller_stream_refusals_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(refused("node_mismatch"), Some(2.0), "{}", m.0);
    // At least one per impostor (tonic's channel may try a refused connection twice).
    assert!(refused("tls_handshake") >= Some(2.0), "{}", m.0);
    assert_eq!(refused("no_identity"), Some(0.0));
    // node-a as it was; nobody else has a series.
    assert_eq!(m.get("rpclb_controller_agents_connected", &[]), Some(1.0));
    let node_a = [("node", "node-a")];
    assert_eq!(
        m.get("rpclb_controller_agent_apply_failing", &node_a),
        Some(0.0)
    );
    assert_eq!(
        m.get("rpclb_controller_agent_acked_version", &node_a),
        m.get("rpclb_controller_published_version", &[])
    );
    assert_eq!(m.get("rpclb_controller_agent_streams", &node_a), Some(1.0));
    for name in ["node-b", "made-up-7"] {
        assert!(
            !m.0.contains(&format!("node=\"{name}\"")),
            "{name} has a series:\n{}",
            m.0
        );
    }
    let log = ctl.log();
    assert!(log.contains("reason=\"node_mismatch\""), "{log}");
    assert!(log.contains("TLS handshake refused"), "{log}");
    let am = a.scrape();
    assert_eq!(am.get("rpclb_controller_connected", &[]), Some(1.0));
    assert_eq!(am.get("rpclb_controller_reconnects", &[]), Some(0.0));
    assert_eq!(reached(&lab, 4).len(), 2, "traffic as before");
}

/// `https://` against a plaintext controller fails clearly; plaintext needs
/// `--insecure` on both sides, and says so at start.
#[test]
fn plaintext_needs_insecure_and_https_never_downgrades() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let dir = TestDir::new("mtls-plaintext");
    let certs = dir.certs(&["node-a"]);
    dir.write_config(&config(&lab, &[1]));

    // Refused at start, before anything is touched.
    let run = |bin: &std::path::Path, args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cfg = dir.config().display().to_string();
    let (code, err) = run(
        controller_bin(),
        &["--config", &cfg, "--listen", "127.0.0.1:0"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("needs mutual TLS: pass --tls-ca, --tls-cert and --tls-key")
            && err.contains("--insecure"),
        "{err}"
    );
    let pin = dir.path().join("pins").display().to_string();
    let (code, err) = run(
        agent_bin(),
        &[
            "--controller",
            "http://127.0.0.1:1",
            "--node-name",
            "node-a",
            "--interfaces",
            "lo",
            "--pin-path",
            &pin,
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("http:// is plaintext and unauthenticated") && err.contains("--insecure"),
        "{err}"
    );
    let (code, err) = run(
        agent_bin(),
        &[
            "--controller",
            "https://127.0.0.1:1",
            "--node-name",
            "node-a",
            "--interfaces",
            "lo",
            "--pin-path",
            &pin,
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("https:// needs --tls-ca, --tls-cert and --tls-key"),
        "{err}"
    );
    let (code, err) = run(
        agent_bin(),
        &[
            "--controller",
            "https://127.0.0.1:1",
            "--insecure",
            "--node-name",
            "node-a",
            "--interfaces",
            "lo",
            "--pin-path",
            &pin,
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("https:// always means TLS"), "{err}");
    assert!(!dir.path().join("pins").exists(), "nothing pinned");

    // A plaintext controller (--insecure, said at start); an https:// agent never gets a state.
    let mut ctl = controller(&lab, &dir, "controller", &["--insecure".to_string()]);
    assert!(
        ctl.log()
            .contains("--insecure: the agent stream is PLAINTEXT"),
        "{}",
        ctl.log()
    );
    assert_eq!(
        scrape_controller(&mut ctl).get("rpclb_controller_insecure", &[]),
        Some(1.0)
    );
    let mut a = agent(
        &lab,
        &dir,
        "agent-tls",
        &https(),
        &agent_tls_args(&certs, "node-a"),
    );
    wait_until("the agent's TLS error", Duration::from_secs(20), || {
        a.check_alive();
        a.log()
            .contains("TLS handshake with 127.0.0.1:50551 failed")
    });
    let log = a.log();
    assert!(log.contains("is it a plaintext controller?"), "{log}");
    assert!(!log.contains("connected to the controller"), "{log}");
    assert_eq!(a.get("/readyz").0, 503, "no state, not ready");
    assert_eq!(a.scrape().get("rpclb_controller_connected", &[]), Some(0.0));
    assert_eq!(
        scrape_controller(&mut ctl).get("rpclb_controller_agents_connected", &[]),
        Some(0.0)
    );
    drop(a);

    // With --insecure on both sides, plaintext works (and the agent says so).
    let mut a = agent(
        &lab,
        &dir,
        "agent-plain",
        &format!("http://127.0.0.1:{GRPC}"),
        &["--insecure".to_string()],
    );
    a.wait_ready();
    let log = a.log();
    assert!(
        log.contains("--insecure: the controller stream is PLAINTEXT"),
        "{log}"
    );
    assert!(
        log.contains("connected to the controller (plaintext)"),
        "{log}"
    );
}

/// New certificate files, for the agent and then the controller, mid-run:
/// the agent reconnects with its new certificate, the controller serves new
/// connections with its new one, nothing restarts, and no connection through
/// the VIP fails or breaks meanwhile.
#[test]
fn rotated_certificates_are_used_without_a_restart_or_a_lost_flow() {
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("mtls-rotate");
    let certs = dir.certs(&["node-a"]);
    let ca = certs.load_ca().unwrap();
    dir.write_config(&config(&lab, &[1, 2]));
    let mut ctl = controller(&lab, &dir, "controller", &controller_tls_args(&certs));
    let mut a = agent(
        &lab,
        &dir,
        "agent",
        &https(),
        &agent_tls_args(&certs, "node-a"),
    );
    a.wait_ready();
    let v1 = scrape_controller(&mut ctl)
        .get("rpclb_controller_published_version", &[])
        .expect("published version");
    let agent_pid = a.pid();
    let ctl_pid = ctl.pid();
    let mut held = HeldConn::open(&lab.client().ns, SocketAddrV4::new(VIP, 80)).expect("held");
    held.echo("before");

    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            let lim = Limits {
                per_op: Duration::from_secs(1),
                total: Duration::from_secs(2),
            };
            let deadline = Instant::now() + Duration::from_secs(90);
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let r = lab
                    .client()
                    .ns
                    .run(|| lab::tcp_attempts(SocketAddrV4::new(VIP, 80), 1, lim))
                    .expect("client namespace");
                match r.into_iter().next() {
                    Some(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        });

        // The agent's certificate is replaced.
        let old_ctl_serial = served_serial(&lab, client_cfg(&certs.node_paths("node-a")));
        certs.write_node(&ca, "node-a", Validity::days(1)).unwrap();
        let new_agent = Material::read(&certs.node_paths("node-a"))
            .unwrap()
            .leaf
            .serial;
        a.wait_metric("rpclb_controller_cert_rotations", 1.0);
        a.wait_metric("rpclb_controller_connected", 1.0);
        let log = a.log();
        assert!(
            log.contains(&format!("new client certificate (serial {new_agent}")),
            "{log}"
        );
        assert!(
            log.contains(&format!("cert_serial=\"{new_agent}\""))
                || log.contains(&format!("cert_serial={new_agent}")),
            "{log}"
        );
        held.echo("after the agent's rotation");

        // The controller's certificate is replaced: new connections get it.
        certs.write_controller(&ca, &[], Validity::days(1)).unwrap();
        let new_ctl = Material::read(&certs.controller_paths())
            .unwrap()
            .leaf
            .serial;
        assert_ne!(new_ctl, old_ctl_serial);
        wait_until(
            "the controller to serve its new certificate",
            Duration::from_secs(10),
            || served_serial(&lab, client_cfg(&certs.node_paths("node-a"))) == new_ctl,
        );
        assert!(
            ctl.log().contains("new TLS certificate files loaded"),
            "{}",
            ctl.log()
        );
        // The agent rotates again, and so meets the new controller certificate; the
        // new stream carries a change.
        certs.write_node(&ca, "node-a", Validity::days(1)).unwrap();
        a.wait_metric("rpclb_controller_cert_rotations", 2.0);
        a.wait_metric("rpclb_controller_connected", 1.0);
        dir.write_config(&config(&lab, &[1]));
        a.wait_metric("rpclb_controller_version", v1 + 1.0);
        wait_until(
            "traffic to follow the change",
            Duration::from_secs(10),
            || reached(&lab, 4).len() == 1,
        );
        held.echo("after the controller's rotation");
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 20, "only {ok} connections made");
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    // Neither process restarted.
    assert_eq!((a.pid(), ctl.pid()), (agent_pid, ctl_pid));
    a.check_alive();
    ctl.check_alive();
    let m = scrape_controller(&mut ctl);
    assert_eq!(m.get("rpclb_controller_tls_reloads_total", &[]), Some(1.0));
    assert_eq!(m.get("rpclb_controller_agents_connected", &[]), Some(1.0));
    assert_eq!(
        m.get(
            "rpclb_controller_stream_refusals_total",
            &[("reason", "tls_handshake")]
        ),
        Some(0.0)
    );
}

/// A short-lived agent certificate: the agent reconnects at two thirds of its
/// lifetime; once it expires the controller ends the stream and refuses it;
/// a new certificate brings the agent back. The data path serves throughout.
#[test]
fn an_agent_reconnects_before_its_certificate_expires() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let _tcp = lab.start_tcp_servers(8080).unwrap();
    let dir = TestDir::new("mtls-expiry");
    let certs = dir.certs(&["node-a"]);
    let ca = certs.load_ca().unwrap();
    dir.write_config(&config(&lab, &[1]));
    let mut ctl = controller(&lab, &dir, "controller", &controller_tls_args(&certs));
    agent_bin();
    // The certificate's life starts now, right before the agent does.
    certs
        .write_node(&ca, "node-a", Validity::from_now(Duration::from_secs(18)))
        .unwrap();
    let born = Instant::now();
    let mut a = agent(
        &lab,
        &dir,
        "agent",
        &https(),
        &agent_tls_args(&certs, "node-a"),
    );
    a.wait_ready();
    let m = a.scrape();
    assert!(m.get("rpclb_controller_cert_expiry_timestamp_seconds", &[]) > Some(1.0e9));
    // Two thirds of 18 s: a reconnect at ~12 s, before the expiry at 18 s.
    wait_until("the renewal reconnect", Duration::from_secs(20), || {
        a.scrape().get("rpclb_controller_cert_rotations", &[]) == Some(1.0)
    });
    assert!(
        born.elapsed() < Duration::from_secs(18),
        "reconnected after the expiry"
    );
    assert!(
        a.log().contains("two thirds through its lifetime"),
        "{}",
        a.log()
    );
    // Expired: the controller ends the stream; the agent keeps serving.
    wait_until(
        "the stream to end at expiry",
        Duration::from_secs(20),
        || ctl.log().contains("its client certificate expired"),
    );
    a.wait_metric("rpclb_controller_connected", 0.0);
    assert_eq!(reached(&lab, 3).len(), 1, "still serving");
    assert_eq!(a.get("/readyz").0, 200);
    // A new certificate: back at once.
    certs.write_node(&ca, "node-a", Validity::days(1)).unwrap();
    a.wait_metric("rpclb_controller_connected", 1.0);
    assert_eq!(
        scrape_controller(&mut ctl).get("rpclb_controller_agents_connected", &[]),
        Some(1.0)
    );
}
