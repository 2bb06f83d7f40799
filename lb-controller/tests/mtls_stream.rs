//! The controller's stream over mutual TLS, in one process on 127.0.0.1: the
//! real `StateService` behind `lb_api::tls::server::incoming`, and tonic
//! clients through `lb_api::tls::client::TlsConnector` with certificates from
//! `lb_api::tls::certs`. Who may watch what, what is refused and counted, and
//! what a rotated or expiring certificate does. (tests/tests/mtls.rs runs the
//! same rules with the real binaries and traffic in a netns lab.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lb_api::tls::certs::{Bundle, Validity, write_atomic};
use lb_api::tls::client::TlsConnector;
use lb_api::tls::reload::{Polled, Reloader};
use lb_api::tls::rustls::pki_types::ServerName;
use lb_api::tls::server::{Acceptor, incoming};
use lb_api::tls::{ServerConfig, TlsPaths, client_config, rustls, server_config};
use lb_api::wire::{NodeState, StateStreamClient, pb};
use lb_controller::grpc::{Agents, Publisher, RefusalReason, StateService, StreamRefusals};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rpclb-ctl-mtls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A controller on 127.0.0.1 with version 1 published.
struct Ctl {
    addr: SocketAddr,
    publisher: Arc<Publisher>,
    agents: Arc<Agents>,
    refusals: Arc<StreamRefusals>,
    tls: Reloader<ServerConfig>,
}

impl Ctl {
    async fn start(b: &Bundle, insecure: bool) -> Ctl {
        let tls = Reloader::new(b.controller_paths(), server_config).unwrap();
        let publisher = Arc::new(Publisher::with_epoch(0));
        publisher.publish(NodeState::default(), BTreeMap::new());
        let agents = Arc::new(Agents::default());
        let refusals = Arc::new(StreamRefusals::default());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let r = refusals.clone();
        let inc = incoming(
            l,
            Acceptor {
                tls: (!insecure).then(|| tls.subscribe()),
                handshake_timeout: Duration::from_secs(5),
                max_handshakes: 8,
                on_handshake_error: Arc::new(move || r.count(RefusalReason::TlsHandshake)),
            },
        );
        let mut svc = StateService::new(&publisher, agents.clone()).with_refusals(refusals.clone());
        if insecure {
            svc = svc.insecure();
        }
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc.into_server())
                .serve_with_incoming(inc),
        );
        Ctl {
            addr,
            publisher,
            agents,
            refusals,
            tls,
        }
    }

    fn refused(&self, r: RefusalReason) -> u64 {
        self.refusals.get(r)
    }
}

/// A channel to the controller with `cfg` (TLS to "localhost").
async fn channel(addr: SocketAddr, cfg: rustls::ClientConfig) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://127.0.0.1:{}", addr.port()))
        .unwrap()
        .origin(
            format!("https://localhost:{}", addr.port())
                .parse()
                .unwrap(),
        )
        .connect_with_connector(TlsConnector::new(
            Arc::new(cfg),
            ServerName::try_from("localhost").unwrap(),
        ))
        .await
        .map_err(|e| format!("{e:?}"))
}

fn client_cfg(paths: &TlsPaths) -> rustls::ClientConfig {
    client_config(&lb_api::tls::Material::read(paths).unwrap(), None).unwrap()
}

type Stream = (
    mpsc::Sender<pb::AgentMessage>,
    Streaming<pb::ControllerMessage>,
);

/// Opens a Watch and says Hello{node}.
async fn watch(ch: Channel, node: &str) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            node: node.into(),
            agent_version: "test".into(),
            applied_version: 0,
        })),
    })
    .await
    .unwrap();
    let inbound = StateStreamClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

fn ack(version: u64, error: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
            version,
            error: error.into(),
            refused: Vec::new(),
        })),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_node_certificate_watches_and_acks_for_its_own_node_only() {
    let dir = scratch("own");
    let b = Bundle::write(&dir, &["node-a", "node-b"], &[], Validity::days(1)).unwrap();
    let ctl = Ctl::start(&b, false).await;

    // node-a as itself: a snapshot, and its ack counts for node-a.
    let ch = channel(ctl.addr, client_cfg(&b.node_paths("node-a")))
        .await
        .unwrap();
    let (tx, mut inbound) = watch(ch.clone(), "node-a").await.unwrap();
    let first = inbound.message().await.unwrap().unwrap();
    assert_eq!(first.version, 1);
    tx.send(ack(1, "")).await.unwrap();
    eventually("node-a's ack", || {
        ctl.agents
            .snapshot()
            .get("node-a")
            .is_some_and(|s| s.acked == 1)
    })
    .await;

    // node-b's real agent is connected and healthy.
    let chb = channel(ctl.addr, client_cfg(&b.node_paths("node-b")))
        .await
        .unwrap();
    let (txb, mut inb) = watch(chb, "node-b").await.unwrap();
    inb.message().await.unwrap().unwrap();
    txb.send(ack(1, "")).await.unwrap();
    eventually("node-b's ack", || {
        ctl.agents
            .snapshot()
            .get("node-b")
            .is_some_and(|s| s.acked == 1)
    })
    .await;
    let before = ctl.agents.snapshot()["node-b"].clone();

    // node-a's certificate posing as node-b: refused, node-b untouched.
    let e = watch(ch.clone(), "node-b").await.expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("\"node-a\"") && e.message().contains("\"node-b\""),
        "{e:?}"
    );
    assert_eq!(ctl.refused(RefusalReason::NodeMismatch), 1);
    let after = ctl.agents.snapshot()["node-b"].clone();
    assert_eq!(after, before, "node-b's status is untouched");
    assert_eq!((after.open, after.error.as_deref()), (1, None));
    // A made-up node: refused, and no status (no metric series) for it.
    let e = watch(ch.clone(), "made-up-1").await.expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(!ctl.agents.snapshot().contains_key("made-up-1"));
    // An ack on node-a's own stream, with an error, is node-a's.
    tx.send(ack(1, "boom")).await.unwrap();
    eventually("node-a's error", || {
        ctl.agents.snapshot()["node-a"].error.as_deref() == Some("boom")
    })
    .await;
    assert_eq!(ctl.agents.snapshot()["node-b"].error, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn another_ca_no_certificate_or_no_node_are_refused() {
    let dir = scratch("refused");
    let b = Bundle::write(&dir, &["node-a"], &[], Validity::days(1)).unwrap();
    let other = Bundle::write(&dir.join("other"), &["node-a"], &[], Validity::days(1)).unwrap();
    let ctl = Ctl::start(&b, false).await;

    // A certificate from another CA (trusting the right CA for the server).
    let mut p = other.node_paths("node-a");
    p.ca = b.ca();
    let r = match channel(ctl.addr, client_cfg(&p)).await {
        Ok(ch) => watch(ch, "node-a")
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}")),
        Err(e) => Err(e),
    };
    assert!(r.is_err(), "another CA's certificate was accepted");
    eventually("a counted handshake refusal", || {
        ctl.refused(RefusalReason::TlsHandshake) == 1
    })
    .await;

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    let m = lb_api::tls::Material::read(&b.node_paths("node-a")).unwrap();
    for c in m.ca {
        roots.add(c).unwrap();
    }
    let mut none = rustls::ClientConfig::builder_with_provider(lb_api::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    none.alpn_protocols = vec![b"h2".to_vec()];
    let r = match channel(ctl.addr, none).await {
        Ok(ch) => watch(ch, "node-a")
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}")),
        Err(e) => Err(e),
    };
    assert!(r.is_err(), "a client without a certificate was accepted");
    eventually("a second handshake refusal", || {
        ctl.refused(RefusalReason::TlsHandshake) == 2
    })
    .await;

    // The right CA, but no rpclb://node/ URI.
    let ca = b.load_ca().unwrap();
    let c = ca
        .client_with_uris("someone", &[], Validity::days(1))
        .unwrap();
    let p = TlsPaths {
        ca: b.ca(),
        cert: dir.join("nobody.pem"),
        key: dir.join("nobody-key.pem"),
    };
    write_atomic(&p.cert, &c.cert_pem, false).unwrap();
    write_atomic(&p.key, &c.key_pem, true).unwrap();
    let ch = channel(ctl.addr, client_cfg(&p)).await.unwrap();
    let e = watch(ch, "node-a").await.expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("rpclb://node/"), "{e:?}");
    assert_eq!(ctl.refused(RefusalReason::NoIdentity), 1);
    assert!(ctl.agents.snapshot().is_empty(), "nobody got a status");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_node_has_at_most_two_streams() {
    let dir = scratch("bound");
    let b = Bundle::write(&dir, &["node-a"], &[], Validity::days(1)).unwrap();
    let ctl = Ctl::start(&b, false).await;
    let ch = channel(ctl.addr, client_cfg(&b.node_paths("node-a")))
        .await
        .unwrap();
    let s1 = watch(ch.clone(), "node-a").await.unwrap();
    let _s2 = watch(ch.clone(), "node-a").await.unwrap();
    let e = watch(ch.clone(), "node-a").await.expect_err("refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(ctl.refused(RefusalReason::TooManyStreams), 1);
    assert_eq!(ctl.agents.snapshot()["node-a"].open, 2);
    drop(s1);
    eventually("the closed stream to count down", || {
        ctl.agents.snapshot()["node-a"].open == 1
    })
    .await;
    watch(ch, "node-a").await.expect("a stream again");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn insecure_mode_checks_node_names() {
    let dir = scratch("insecure");
    let b = Bundle::write(&dir, &[], &[], Validity::days(1)).unwrap();
    let ctl = Ctl::start(&b, true).await;
    let ch = Endpoint::from_shared(format!("http://{}", ctl.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (_tx, mut inbound) = watch(ch.clone(), "node-a").await.unwrap();
    assert_eq!(inbound.message().await.unwrap().unwrap().version, 1);
    for bad in ["Node_A", "", &"a".repeat(254)] {
        let e = watch(ch.clone(), bad).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    assert_eq!(ctl.refused(RefusalReason::InvalidNodeName), 3);
    assert_eq!(ctl.agents.snapshot().keys().collect::<Vec<_>>(), ["node-a"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_rotated_server_certificate_serves_new_connections_and_old_streams_go_on() {
    let dir = scratch("rotate");
    let b = Bundle::write(&dir, &["node-a"], &[], Validity::days(1)).unwrap();
    let mut ctl = Ctl::start(&b, false).await;
    let old = ctl.tls.current().leaf.serial.clone();
    assert_eq!(
        served_serial(ctl.addr, client_cfg(&b.node_paths("node-a"))).await,
        old
    );
    let ch = channel(ctl.addr, client_cfg(&b.node_paths("node-a")))
        .await
        .unwrap();
    let (_tx, mut inbound) = watch(ch, "node-a").await.unwrap();
    inbound.message().await.unwrap().unwrap();

    // New controller files.
    let ca = b.load_ca().unwrap();
    b.write_controller(&ca, &[], Validity::days(1)).unwrap();
    assert_eq!(ctl.tls.poll(), Polled::Reloaded);
    let new = ctl.tls.current().leaf.serial.clone();
    assert_ne!(new, old);
    assert_eq!(
        served_serial(ctl.addr, client_cfg(&b.node_paths("node-a"))).await,
        new
    );
    // The stream opened before goes on: it gets the next version.
    let mut n = NodeState::default();
    n.timeouts.udp = Duration::from_secs(7);
    ctl.publisher.publish(n, BTreeMap::new());
    let m = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.version, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The serial of the certificate the controller serves to a new connection.
async fn served_serial(addr: SocketAddr, cfg: rustls::ClientConfig) -> String {
    let tls = TlsConnector::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
        .connect("127.0.0.1", addr.port())
        .await
        .unwrap();
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    lb_api::tls::LeafInfo::parse(leaf).unwrap().serial
}

#[tokio::test]
async fn a_stream_ends_when_its_client_certificate_expires() {
    let dir = scratch("expiry");
    let b = Bundle::write(&dir, &[], &[], Validity::days(1)).unwrap();
    let ca = b.load_ca().unwrap();
    b.write_node(&ca, "node-a", Validity::from_now(Duration::from_secs(3)))
        .unwrap();
    let ctl = Ctl::start(&b, false).await;
    let ch = channel(ctl.addr, client_cfg(&b.node_paths("node-a")))
        .await
        .unwrap();
    let (_tx, mut inbound) = watch(ch, "node-a").await.unwrap();
    inbound.message().await.unwrap().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("the stream ends at expiry");
    let e = end.expect_err("an error status");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    eventually("the stream to close", || {
        ctl.agents.snapshot()["node-a"].open == 0
    })
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
}
