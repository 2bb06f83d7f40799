//! Lab tests of the gRPC mode's TLS (`grpc.tls`): the userspace proxy in the
//! lab's node namespace terminates TLS from clients and/or originates TLS to
//! the backends, with certificates of a test CA (lb-api's `certs`, rcgen)
//! written as PEM files; a second CA stands for "not trusted". Clients are
//! tonic over a rustls connector in the client namespace; backends are
//! `rpclb_tests::grpc`'s TestService, over TLS when asked. Need root; each
//! test prints SKIP and passes otherwise (fails under CI).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_agent::health::HealthChecker;
use lb_agent::userspace::{ProxyOptions, ServiceStats, UserspaceProxy};
use lb_api::tls::ClientConfig;
use lb_api::tls::client::TlsConnector;
use lb_api::tls::rustls::pki_types::ServerName;
use lb_api::{
    Algorithm, Backend, DesiredState, GrpcPolicy, GrpcTls, HealthCheck, HealthCheckKind, ListenTls,
    Protocol, Service, UpstreamTls,
};
use rpclb_tests::grpc::proto::SimpleRequest;
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::{GrpcServer, Journal, ServerOptions, TestBackend, block_on_in};
use rpclb_tests::lab::Lab;
use rpclb_tests::skip_unless_lab;
use rpclb_tests::tls::{Pki, client_config, client_config_with, peer_leaf, server_config};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const PORT: u16 = 50051;
const BACKEND_PORT: u16 = 50051;
/// The name in the proxy's listener certificate (with the VIP).
const LISTEN_NAME: &str = "grpc.lab";
/// Bound of every single call, connect and wait in these tests.
const CALL: Duration = Duration::from_secs(5);

/// A TestService in every backend namespace, answering `backend-<i>`; over
/// TLS where `tls(i, ip)` gives a configuration.
struct Backends {
    journal: Arc<Journal>,
    _servers: Vec<GrpcServer>,
}

impl Backends {
    fn start(
        lab: &Lab,
        tls: impl Fn(usize, Ipv4Addr) -> Option<Arc<lb_api::tls::ServerConfig>>,
    ) -> Backends {
        let journal = Arc::new(Journal::default());
        let servers = (1..=lab.backends().len())
            .map(|i| {
                let host = lab.backend(i);
                let backend = TestBackend::new(i, format!("backend-{i}"), journal.clone());
                let opts = ServerOptions {
                    tls: tls(i, host.ip()),
                    ..ServerOptions::default()
                };
                let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT));
                GrpcServer::start_with(&host.ns, any, backend, opts).expect("gRPC backend")
            })
            .collect();
        Backends {
            journal,
            _servers: servers,
        }
    }

    fn served(&self, i: usize) -> u64 {
        self.journal.served(i)
    }
}

/// The proxy, in the node namespace, following TLS files every 100 ms.
fn proxy(lab: &Lab) -> UserspaceProxy {
    let opts = ProxyOptions {
        worker_threads: 2,
        grpc_tls_poll: Duration::from_millis(100),
        ..ProxyOptions::default()
    };
    lab.node()
        .run(move || UserspaceProxy::start(opts))
        .expect("node namespace")
        .expect("start the proxy")
}

fn text(p: &Path) -> String {
    p.display().to_string()
}

fn backends(lab: &Lab) -> Vec<Backend> {
    lab.backends()
        .iter()
        .map(|h| Backend::new(h.ip(), BACKEND_PORT))
        .collect()
}

fn service(backends: Vec<Backend>, tls: Option<GrpcTls>) -> Service {
    let mut s = Service::new(
        "lab/tls:grpc",
        VIP,
        PORT,
        Protocol::Tcp,
        Algorithm::Random,
        backends,
    );
    s.grpc = Some(GrpcPolicy {
        tls,
        ..GrpcPolicy::default()
    });
    s
}

fn state(s: &Service) -> DesiredState {
    DesiredState {
        services: vec![s.clone()],
    }
}

fn stats(p: &UserspaceProxy) -> ServiceStats {
    p.stats()
        .into_iter()
        .find(|s| s.addr.vip == VIP && s.addr.port == PORT)
        .expect("stats of the service")
}

/// Polls the stats until `ok` holds (at most 5 s); the last ones either way.
fn settled(p: &UserspaceProxy, ok: impl Fn(&ServiceStats) -> bool) -> ServiceStats {
    let deadline = Instant::now() + CALL;
    loop {
        let s = stats(p);
        if ok(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A channel to the VIP over TLS (one connection, made now), verifying
/// the proxy's certificate for `name`.
async fn tls_channel(
    config: Arc<ClientConfig>,
    name: &str,
) -> Result<TestServiceClient<Channel>, tonic::transport::Error> {
    let name = ServerName::try_from(name.to_string()).expect("server name");
    let ch = Endpoint::from_shared(format!("http://{VIP}:{PORT}"))
        .unwrap()
        .connect_timeout(CALL)
        .connect_with_connector(TlsConnector::new(config, name))
        .await?;
    Ok(TestServiceClient::new(ch))
}

/// One call over a new plaintext (h2c) connection, whatever fails.
async fn h2c_call() -> Result<String, String> {
    let ch = Endpoint::from_shared(format!("http://{VIP}:{PORT}"))
        .unwrap()
        .connect_timeout(CALL)
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    unary(&mut TestServiceClient::new(ch))
        .await
        .map_err(|e| e.to_string())
}

/// A plaintext (h2c) channel to the VIP.
async fn h2c_channel() -> TestServiceClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{VIP}:{PORT}"))
        .unwrap()
        .connect_timeout(CALL)
        .connect()
        .await
        .expect("connect to the VIP");
    TestServiceClient::new(ch)
}

async fn unary(c: &mut TestServiceClient<Channel>) -> Result<String, Status> {
    match tokio::time::timeout(CALL, c.unary_call(SimpleRequest::default())).await {
        Ok(r) => r.map(|r| r.into_inner().served_by),
        Err(_) => Err(Status::unknown("test: call not answered in time")),
    }
}

/// `n` calls on `c`, 4 at a time; each must succeed. Calls per backend.
async fn calls(c: &TestServiceClient<Channel>, n: usize) -> BTreeMap<String, usize> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..4 {
        let mut c = c.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            for k in (w..n).step_by(4) {
                out.push(
                    unary(&mut c)
                        .await
                        .unwrap_or_else(|e| panic!("call {k}: {e}")),
                );
            }
            out
        });
    }
    let mut per = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        for b in r.expect("caller task") {
            *per.entry(b).or_default() += 1;
        }
    }
    per
}

type RawSender = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// An HTTP/2 connection over TLS to the VIP, made by hand (no reconnects,
/// unlike a tonic channel): its sender and the certificate presented.
async fn raw_connection(config: Arc<ClientConfig>) -> (RawSender, lb_api::tls::LeafInfo) {
    let name = ServerName::try_from(LISTEN_NAME)
        .expect("server name")
        .to_owned();
    let s = TlsConnector::new(config, name)
        .connect(&VIP.to_string(), PORT)
        .await
        .expect("TLS connect");
    let leaf = peer_leaf(&s);
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    (send, leaf)
}

/// One UnaryCall on `send`: its `grpc-status`.
async fn raw_unary(send: &mut RawSender) -> Result<String, String> {
    use http_body_util::BodyExt;
    let req = tonic::codegen::http::Request::post(format!(
        "http://{VIP}:{PORT}/grpc.testing.TestService/UnaryCall"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    // One empty message: not compressed, length 0.
    .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
        0, 0, 0, 0, 0,
    ])))
    .unwrap();
    let call = async {
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let t = body.trailers().ok_or_else(|| "no trailers".to_string())?;
        Ok(rpclb_tests::grpc::text(t, "grpc-status"))
    };
    tokio::time::timeout(CALL, call)
        .await
        .unwrap_or_else(|_| Err("test: call not answered in time".into()))
}

/// A TLS connection to the VIP, made by hand: the certificate the proxy
/// presented, or the handshake's error.
async fn handshake(config: Arc<ClientConfig>) -> Result<lb_api::tls::LeafInfo, String> {
    let name = ServerName::try_from(LISTEN_NAME)
        .expect("server name")
        .to_owned();
    let c = TlsConnector::new(config, name);
    match tokio::time::timeout(CALL, c.connect(&VIP.to_string(), PORT)).await {
        Ok(Ok(s)) => Ok(peer_leaf(&s)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("test: no handshake in time".into()),
    }
}

/// (1) Termination: a TLS client (tonic over rustls, ALPN h2) through the
/// proxy to h2c backends; calls succeed and spread. A client that trusts
/// another CA, a client that offers only `http/1.1`, and a plaintext
/// client get no call through.
#[test]
fn grpc_tls_terminates_client_tls() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let pki = Pki::new("grpc-tls-terminate");
    let vip = VIP.to_string();
    let (cert, key) = pki.server(&pki.ca, "listen", &[LISTEN_NAME, vip.as_str()]);
    let trusted = pki.ca_file(&pki.ca, "ca");
    let other = pki.ca_file(&pki.other, "other-ca");
    let be = Backends::start(&lab, |_, _| None);
    let p = proxy(&lab);
    let tls = GrpcTls {
        listen: Some(ListenTls {
            cert: text(&cert),
            key: text(&key),
            client_ca: None,
        }),
        upstream: None,
    };
    p.apply(&state(&service(backends(&lab), Some(tls))))
        .expect("apply");

    const N: usize = 90;
    let (per, untrusted, http1, h2c) = block_on_in(&lab.client().ns, || async {
        let c = tls_channel(client_config(&trusted, None), LISTEN_NAME)
            .await
            .expect("TLS connect to the VIP");
        let per = calls(&c, N).await;
        let untrusted = handshake(client_config(&other, None)).await;
        // ALPN without h2: rustls's no_application_protocol alert.
        let http1 = {
            let name = ServerName::try_from(LISTEN_NAME).unwrap().to_owned();
            let cfg = client_config_with(&trusted, None, &[b"http/1.1"]);
            let tcp = tokio::net::TcpStream::connect((VIP, PORT)).await.unwrap();
            tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let h2c = h2c_call().await;
        (per, untrusted, http1, h2c)
    });
    eprintln!("calls per backend over TLS: {per:?}");
    assert_eq!(per.values().sum::<usize>(), N);
    for i in 1..=3 {
        let n = per.get(&format!("backend-{i}")).copied().unwrap_or(0);
        assert!(n >= 10, "backend-{i} got {n} of {N}: {per:?}");
        assert_eq!(be.served(i), n as u64);
    }
    let e = untrusted.expect_err("a client trusting another CA must fail");
    assert!(e.contains("UnknownIssuer"), "{e}");
    let e = http1.expect_err("a client without h2 in its ALPN must fail");
    assert!(e.contains("NoApplicationProtocol"), "{e}");
    let e = h2c.expect_err("a plaintext client of a TLS listener must fail");
    eprintln!("plaintext client: {e}");
    // Each refused handshake is counted.
    let s = settled(&p, |s| s.tls_handshake_failures >= 3);
    assert!(
        s.tls_handshake_failures >= 3,
        "{}",
        s.tls_handshake_failures
    );
    // The good client's connection is counted too, and /metrics carries both (as
    // `rpclb_service_grpc_tls_handshakes_total{result="ok"|"failed"}`).
    assert!(s.tls && s.tls_handshakes >= 1, "{}", s.tls_handshakes);
    let m = lb_agent::userspace::datapath_snapshot(std::slice::from_ref(&s));
    let t = m.services[0]
        .grpc_tls
        .expect("TLS counters of a TLS service");
    assert_eq!(
        (t.handshakes, t.handshake_failures),
        (s.tls_handshakes, s.tls_handshake_failures)
    );
    assert_eq!(
        be.served(1) + be.served(2) + be.served(3),
        N as u64,
        "no other call reached a backend"
    );
}

/// (2) Origination: an h2c client; the proxy speaks TLS to the backends and
/// verifies them against the CA. A backend whose certificate comes from
/// another CA gets no call: calls that picked it go to the others (nothing
/// was sent); alone, it makes the calls fail with UNAVAILABLE.
#[test]
fn grpc_tls_originates_to_backends() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let pki = Pki::new("grpc-tls-originate");
    let ca = pki.ca_file(&pki.ca, "ca");
    let be = Backends::start(&lab, |i, ip| {
        let issuer = if i == 3 { &pki.other } else { &pki.ca };
        let (c, k) = pki.server(issuer, &format!("backend-{i}"), &[ip.to_string().as_str()]);
        Some(server_config(&c, &k))
    });
    let p = proxy(&lab);
    let tls = GrpcTls {
        listen: None,
        upstream: Some(UpstreamTls {
            ca: text(&ca),
            server_name: None,
            cert: None,
            key: None,
        }),
    };
    let svc = service(backends(&lab), Some(tls.clone()));
    p.apply(&state(&svc)).expect("apply");

    const N: usize = 60;
    let per = block_on_in(&lab.client().ns, || async {
        calls(&h2c_channel().await, N).await
    });
    eprintln!("calls per backend: {per:?}");
    assert_eq!(per.values().sum::<usize>(), N);
    assert!(per.get("backend-1").copied().unwrap_or(0) >= 10, "{per:?}");
    assert!(per.get("backend-2").copied().unwrap_or(0) >= 10, "{per:?}");
    assert_eq!(be.served(3), 0, "the untrusted backend got no call");
    let s = stats(&p);
    let b3 = s
        .backends
        .iter()
        .find(|b| b.ip == lab.backend(3).ip())
        .expect("backend 3");
    assert!(b3.connect_failures >= 1, "its TLS handshakes failed");
    assert_eq!(b3.new_connections, 0, "no connection to it was pooled");

    // The untrusted backend alone: UNAVAILABLE, saying why.
    let only3 = service(
        vec![Backend::new(lab.backend(3).ip(), BACKEND_PORT)],
        Some(tls),
    );
    p.apply(&state(&only3)).expect("apply");
    let r = block_on_in(&lab.client().ns, || async {
        unary(&mut h2c_channel().await).await
    });
    let e = r.expect_err("no trusted backend");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("TLS handshake") && e.message().contains("UnknownIssuer"),
        "{e:?}"
    );
    assert_eq!(be.served(3), 0);
}

/// (3) Both ways, with client certificates (mutual TLS from clients) and a
/// configured `server_name` for the backends.
#[test]
fn grpc_tls_both_ways_with_client_certificates() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let pki = Pki::new("grpc-tls-both");
    let ca = pki.ca_file(&pki.ca, "ca");
    let (cert, key) = pki.server(&pki.ca, "listen", &[LISTEN_NAME]);
    let (ccert, ckey) = pki.client(&pki.ca, "lab-client");
    let (ocert, okey) = pki.client(&pki.other, "other-client");
    let be = Backends::start(&lab, |i, _| {
        let (c, k) = pki.server(&pki.ca, &format!("backend-{i}"), &["backend.lab"]);
        Some(server_config(&c, &k))
    });
    let p = proxy(&lab);
    let tls = GrpcTls {
        listen: Some(ListenTls {
            cert: text(&cert),
            key: text(&key),
            client_ca: Some(text(&ca)),
        }),
        upstream: Some(UpstreamTls {
            ca: text(&ca),
            server_name: Some("backend.lab".into()),
            cert: None,
            key: None,
        }),
    };
    p.apply(&state(&service(backends(&lab), Some(tls))))
        .expect("apply");

    const N: usize = 60;
    let (per, anonymous, stranger) = block_on_in(&lab.client().ns, || async {
        let c = tls_channel(
            client_config(&ca, Some((ccert.as_path(), ckey.as_path()))),
            LISTEN_NAME,
        )
        .await
        .expect("mutual TLS connect");
        let per = calls(&c, N).await;
        // Without a certificate, or with one of another CA: TLS 1.3 lets
        // the client finish first; the refusal comes on the first read.
        let mut out = Vec::new();
        for cfg in [
            client_config(&ca, None),
            client_config(&ca, Some((ocert.as_path(), okey.as_path()))),
        ] {
            out.push(match tls_channel(cfg, LISTEN_NAME).await {
                Ok(mut c) => unary(&mut c).await.map_err(|e| e.to_string()),
                Err(e) => Err(format!("{e:?}")),
            });
        }
        (per, out.remove(0), out.remove(0))
    });
    eprintln!("calls per backend: {per:?}");
    assert_eq!(per.values().sum::<usize>(), N);
    assert!(per.len() >= 2, "calls spread: {per:?}");
    anonymous.expect_err("a client without a certificate must fail");
    stranger.expect_err("a client certificate of another CA must fail");
    assert_eq!(
        be.served(1) + be.served(2) + be.served(3),
        N as u64,
        "only the authenticated client's calls reached a backend"
    );
    let s = settled(&p, |s| s.tls_handshake_failures >= 2);
    assert!(
        s.tls_handshake_failures >= 2,
        "{}",
        s.tls_handshake_failures
    );
}

/// (4) Reload: the listener's files are replaced; new connections get the
/// new certificate (its serial), a connection made before keeps working.
/// A broken key file afterwards is refused (counted) and the last good
/// certificate stays.
#[test]
fn grpc_tls_listener_certificate_reloads() {
    skip_unless_lab!();
    let lab = Lab::new(1).expect("lab");
    let pki = Pki::new("grpc-tls-reload");
    let ca = pki.ca_file(&pki.ca, "ca");
    let names = [LISTEN_NAME];
    let (cert, key) = pki.server(&pki.ca, "listen", &names);
    let first = lb_api::tls::LeafInfo::parse(
        &lb_api::tls::certs_in(&cert, &std::fs::read(&cert).unwrap()).unwrap()[0],
    )
    .unwrap();
    let _be = Backends::start(&lab, |_, _| None);
    let p = proxy(&lab);
    let tls = GrpcTls {
        listen: Some(ListenTls {
            cert: text(&cert),
            key: text(&key),
            client_ca: None,
        }),
        upstream: None,
    };
    // A missing file at start: the service is refused, the file named.
    let missing = pki.dir.join("missing-key.pem");
    let broken = GrpcTls {
        listen: Some(ListenTls {
            key: text(&missing),
            ..tls.listen.clone().unwrap()
        }),
        upstream: None,
    };
    let e = p
        .apply(&state(&service(backends(&lab), Some(broken.clone()))))
        .expect_err("missing key file")
        .to_string();
    eprintln!("refused: {e}");
    assert!(
        e.contains("grpc.tls") && e.contains("missing-key.pem") && e.contains("cannot read"),
        "{e}"
    );
    assert!(p.stats().is_empty(), "the service did not start");
    p.apply(&state(&service(backends(&lab), Some(tls))))
        .expect("apply");

    let (seen_first, seen_second, second, after_bad, old_ok) =
        block_on_in(&lab.client().ns, || async {
            let cfg = client_config(&ca, None);
            let (mut old, seen_first) = raw_connection(cfg.clone()).await;
            assert_eq!(
                raw_unary(&mut old).await.as_deref(),
                Ok("0"),
                "call before the reload"
            );
            // New files: key first, then the certificate (each renamed in
            // place); a poll between the two sees a mismatch and keeps the old.
            let (cert, _) = pki.server(&pki.ca, "listen", &names);
            let second = lb_api::tls::LeafInfo::parse(
                &lb_api::tls::certs_in(&cert, &std::fs::read(&cert).unwrap()).unwrap()[0],
            )
            .unwrap();
            let deadline = Instant::now() + CALL;
            let seen_second = loop {
                let l = handshake(cfg.clone()).await.expect("handshake");
                if l.serial == second.serial || Instant::now() > deadline {
                    break l;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            // A broken key: refused; the new certificate stays.
            std::fs::write(&key, "not a key").unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after_bad = handshake(cfg.clone()).await.expect("handshake");
            // The connection made before the reload (with the first
            // certificate) still carries calls.
            let mut old_ok = 0;
            for _ in 0..5 {
                assert_eq!(
                    raw_unary(&mut old).await.as_deref(),
                    Ok("0"),
                    "old connection"
                );
                old_ok += 1;
            }
            (seen_first, seen_second, second, after_bad, old_ok)
        });
    assert_eq!(seen_first.serial, first.serial);
    assert_ne!(first.serial, second.serial);
    assert_eq!(
        seen_second.serial, second.serial,
        "new connections: new certificate"
    );
    assert_eq!(after_bad.serial, second.serial, "a broken set is kept out");
    assert_eq!(old_ok, 5);
    let s = stats(&p);
    eprintln!(
        "reloads {}, refused sets {}",
        s.tls_reloads, s.tls_reload_errors
    );
    assert!(s.tls_reloads >= 1);
    assert!(s.tls_reload_errors >= 1);

    // New settings naming a missing file: refused; the running TLS stays.
    let e = p
        .apply(&state(&service(backends(&lab), Some(broken))))
        .expect_err("missing key file");
    assert!(e.to_string().contains("missing-key.pem"), "{e}");
    let still = block_on_in(&lab.client().ns, || async {
        handshake(client_config(&ca, None)).await
    });
    assert_eq!(still.expect("handshake").serial, second.serial);
}

/// (5) Health checks of a TLS-upstream service speak TLS: a backend with a
/// trusted certificate passes, one with another CA's fails (and goes out);
/// the same checks without TLS fail against the TLS backend.
#[test]
fn grpc_tls_health_checks_speak_tls() {
    skip_unless_lab!();
    let lab = Lab::new(2).expect("lab");
    let pki = Pki::new("grpc-tls-health");
    let ca = pki.ca_file(&pki.ca, "ca");
    let _be = Backends::start(&lab, |i, ip| {
        let issuer = if i == 2 { &pki.other } else { &pki.ca };
        let (c, k) = pki.server(issuer, &format!("backend-{i}"), &[ip.to_string().as_str()]);
        Some(server_config(&c, &k))
    });
    let tls = GrpcTls {
        listen: None,
        upstream: Some(UpstreamTls {
            ca: text(&ca),
            server_name: None,
            cert: None,
            key: None,
        }),
    };
    let mut svc = service(backends(&lab), Some(tls));
    svc.health_check = Some(HealthCheck {
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(500),
        unhealthy_threshold: 2,
        healthy_threshold: 1,
        ..HealthCheck::new(HealthCheckKind::Grpc)
    });
    let b1 = SocketAddrV4::new(lab.backend(1).ip(), BACKEND_PORT);
    let b2 = SocketAddrV4::new(lab.backend(2).ip(), BACKEND_PORT);
    let (with_tls, without_tls) = block_on_in(lab.node(), || async {
        let h = HealthChecker::new();
        let snap = |h: &HealthChecker, b: SocketAddrV4| {
            h.snapshot()
                .into_iter()
                .find(|x| x.backend == b.into())
                .expect("checked backend")
        };
        let wait = |h: HealthChecker, ok: Box<dyn Fn(&HealthChecker) -> bool>| async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ok(&h) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        h.set_targets(&state(&svc));
        wait(
            h.clone(),
            Box::new(move |h: &HealthChecker| snap(h, b1).passed >= 3 && snap(h, b2).failed >= 3),
        )
        .await;
        let with_tls = (snap(&h, b1), snap(&h, b2));
        // The same checks in plaintext: the TLS backend fails them.
        let mut plain = svc.clone();
        plain.grpc.as_mut().unwrap().tls = None;
        h.set_targets(&state(&plain));
        let failed = snap(&h, b1).failed;
        wait(
            h.clone(),
            Box::new(move |h: &HealthChecker| snap(h, b1).failed >= failed + 3),
        )
        .await;
        (with_tls, snap(&h, b1))
    });
    eprintln!("over TLS: {with_tls:?}; without: {without_tls:?}");
    let (good, bad) = with_tls;
    assert!(
        good.healthy && good.passed >= 3 && good.failed == 0,
        "{good:?}"
    );
    assert!(
        !bad.healthy && bad.failed >= 3 && bad.passed == 0,
        "{bad:?}"
    );
    assert!(without_tls.failed >= 3, "{without_tls:?}");
}
