//! TLS for the lab tests: test CAs (lb-api's `certs`, rcgen), their
//! certificates written as PEM files in a scratch folder (removed on drop),
//! and rustls configurations for lab clients and backends (ALPN `h2`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lb_api::tls::certs::{Ca, Validity, write_atomic};
use lb_api::tls::{ClientConfig, LeafInfo, ServerConfig, identity_in, provider, roots_in};

/// A scratch folder with two CAs: `ca` (the one trusted) and `other`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
    pub other: Ca,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("rpclb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch folder");
        Pki {
            dir,
            ca: Ca::new("lab CA", Validity::days(1)).expect("CA"),
            other: Ca::new("other CA", Validity::days(1)).expect("CA"),
        }
    }

    /// `ca`'s certificate, written as `<stem>.pem`.
    pub fn ca_file(&self, ca: &Ca, stem: &str) -> PathBuf {
        let p = self.dir.join(format!("{stem}.pem"));
        write_atomic(&p, &ca.cert_pem, false).expect("write CA");
        p
    }

    /// A serving certificate of `ca` for `names` (DNS names or IPs),
    /// written (atomically) as `<stem>.pem` and `<stem>-key.pem`.
    pub fn server(&self, ca: &Ca, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let c = ca
            .controller(&names, Validity::days(1))
            .expect("certificate");
        self.write(stem, &c.cert_pem, &c.key_pem)
    }

    /// A client certificate of `ca`, written as `<stem>.pem` and `<stem>-key.pem`.
    pub fn client(&self, ca: &Ca, stem: &str) -> (PathBuf, PathBuf) {
        let c = ca
            .client_with_uris(stem, &[], Validity::days(1))
            .expect("certificate");
        self.write(stem, &c.cert_pem, &c.key_pem)
    }

    fn write(&self, stem: &str, cert: &str, key: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}-key.pem")),
        );
        write_atomic(&k, key, true).expect("write key");
        write_atomic(&c, cert, false).expect("write certificate");
        (c, k)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A server configuration (a lab backend) with this certificate; ALPN `h2`.
pub fn server_config(cert: &Path, key: &Path) -> Arc<ServerConfig> {
    let id = identity_in(cert, &read(cert), key, &read(key)).expect("certificate and key");
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(lb_api::tls::rustls::DEFAULT_VERSIONS)
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(id.chain, id.key)
        .expect("server config");
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

/// A client configuration (a lab client) trusting `ca`, with a client
/// certificate if given; ALPN `alpn`.
pub fn client_config_with(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let (roots, _) = roots_in(ca, &read(ca)).expect("CA bundle");
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(lb_api::tls::rustls::DEFAULT_VERSIONS)
        .expect("versions")
        .with_root_certificates(roots);
    let mut c = match identity {
        Some((cert, key)) => {
            let id = identity_in(cert, &read(cert), key, &read(key)).expect("client identity");
            b.with_client_auth_cert(id.chain, id.key)
                .expect("client config")
        }
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// [`client_config_with`], ALPN `h2`.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    client_config_with(ca, identity, &[b"h2"])
}

/// The leaf certificate a TLS connection's peer presented.
pub fn peer_leaf<IO>(s: &tokio_rustls::client::TlsStream<IO>) -> LeafInfo {
    let certs = s
        .get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates");
    LeafInfo::parse(&certs[0]).expect("peer certificate")
}
