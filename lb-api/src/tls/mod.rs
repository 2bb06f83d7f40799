//! Mutual TLS for the controller <-> agent stream (docs/security.md).
//!
//! Both sides load three PEM files: a CA bundle (what they trust in the
//! peer), their certificate chain and its key. The controller requires a
//! client certificate that the CA signed; the agent checks the controller's
//! certificate against the URL's host name. TLS 1.3 only, ALPN `h2`, rustls
//! with the ring provider.
//!
//! - [`Material`]: the three files, read and checked (the key matches the
//!   certificate), and the leaf certificate's facts ([`LeafInfo`]).
//! - [`server_config`], [`client_config`]: rustls configurations from them.
//! - [`reload`]: follows the files; a new good set replaces the configuration
//!   for new connections, a bad or half-written one is logged and the last
//!   good one stays.
//! - [`server`]: a TLS listener for `tonic`'s `serve_with_incoming`; each
//!   connection's verified client certificate reaches the request's
//!   extensions as [`server::PeerInfo`].
//! - [`client`]: a connector for `tonic`'s `connect_with_connector`.
//! - [`identity`]: the node name a certificate carries (`rpclb://node/<name>`).
//! - [`service`]: the gRPC mode's per-service TLS (listener and backends).
//! - `certs` (feature `certs`): a CA, the controller's and the nodes' certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[cfg(any(feature = "certs", test))]
pub mod certs;
pub mod client;
pub mod identity;
pub mod reload;
pub mod server;
pub mod service;

pub use rustls::{self, ClientConfig, ServerConfig};

pub use identity::{IdentityError, NODE_URI_PREFIX, NodeNameError, node_uri, validate_node_name};

/// The ALPN protocol of the stream (gRPC is HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// Where the PEM files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// The CA bundle: what this side trusts in its peer.
    pub ca: PathBuf,
    /// This side's certificate (chain, leaf first).
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("{}: {what}", path.display())]
    Certificate { path: PathBuf, what: String },
    #[error("{} and {}: the key does not match the certificate", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: {source}", path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{}: {source}", path.display())]
    Identity {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("{}: the certificate names node {found:?}, but this agent is node {want:?}", path.display())]
    WrongNode {
        path: PathBuf,
        found: String,
        want: String,
    },
}

/// The facts of a leaf certificate that logs, metrics and checks use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    pub subject: String,
    /// Hex, as `openssl x509 -serial` shows it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SAN URIs.
    pub uris: Vec<String>,
    /// SAN DNS names and IP addresses.
    pub names: Vec<String>,
}

impl LeafInfo {
    /// Reads a DER certificate.
    pub fn parse(der: &[u8]) -> Result<LeafInfo, String> {
        use x509_parser::extensions::GeneralName;
        let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let time = |t: x509_parser::time::ASN1Time| {
            let s = t.timestamp();
            if s >= 0 {
                UNIX_EPOCH + Duration::from_secs(s as u64)
            } else {
                UNIX_EPOCH
            }
        };
        let (mut uris, mut names) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = c.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => names.push(d.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => names.push(<[u8; 4]>::try_from(*b).map_or_else(
                            |_| String::new(),
                            |a| std::net::Ipv4Addr::from(a).to_string(),
                        )),
                        16 => names.push(<[u8; 16]>::try_from(*b).map_or_else(
                            |_| String::new(),
                            |a| std::net::Ipv6Addr::from(a).to_string(),
                        )),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(LeafInfo {
            subject: c.subject().to_string(),
            serial: c.raw_serial_as_string().replace(':', ""),
            not_before: time(c.validity().not_before),
            not_after: time(c.validity().not_after),
            uris,
            names,
        })
    }

    /// The node this certificate speaks for (its one `rpclb://node/` URI).
    pub fn node(&self) -> Result<String, IdentityError> {
        identity::node_of(self.uris.iter().map(String::as_str))
    }

    /// When a holder should have moved to a new certificate: two thirds into
    /// its lifetime (cert-manager renews there by default).
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }

    /// `not_after` as Unix seconds (for metrics and logs).
    pub fn not_after_unix(&self) -> u64 {
        unix(self.not_after)
    }
}

/// Seconds since the epoch (0 before it).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The three files, read and checked.
#[derive(Debug)]
pub struct Material {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub leaf: LeafInfo,
    pub paths: TlsPaths,
}

/// The bytes of the three files (what the reloader compares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contents {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl Contents {
    pub fn read(paths: &TlsPaths) -> Result<Contents, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        Ok(Contents {
            ca: read(&paths.ca)?,
            cert: read(&paths.cert)?,
            key: read(&paths.key)?,
        })
    }
}

/// The certificates of a PEM file (at least one).
pub fn certs_in(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("not a PEM certificate list: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

/// A CA bundle (PEM) as trust anchors, and the first CA's facts.
pub fn roots_in(path: &Path, pem: &[u8]) -> Result<(RootCertStore, LeafInfo), TlsError> {
    let certs = certs_in(path, pem)?;
    let info = LeafInfo::parse(&certs[0]).map_err(|what| TlsError::Certificate {
        path: path.to_path_buf(),
        what,
    })?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| TlsError::Certificate {
            path: path.to_path_buf(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok((roots, info))
}

/// A certificate chain and its private key, checked to match.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub leaf: LeafInfo,
}

/// Reads a certificate chain (PEM, leaf first) and its key (PEM) and checks
/// that they belong together: a certificate rewritten before its key (or the
/// other way round) is refused.
pub fn identity_in(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Identity, TlsError> {
    let chain = certs_in(cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key_path.to_path_buf(),
        what: format!("no usable private key: {e}"),
    })?;
    let leaf = LeafInfo::parse(&chain[0]).map_err(|what| TlsError::Certificate {
        path: cert_path.to_path_buf(),
        what,
    })?;
    let signer = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Pem {
            path: key_path.to_path_buf(),
            what: format!("unusable private key: {e}"),
        })?;
    let ck = rustls::sign::CertifiedKey::new(chain.clone(), signer);
    if matches!(
        ck.keys_match(),
        Err(rustls::Error::InconsistentKeys(
            rustls::InconsistentKeys::KeyMismatch
        ))
    ) {
        return Err(TlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        });
    }
    Ok(Identity { chain, key, leaf })
}

impl Material {
    /// Reads and checks the files.
    pub fn read(paths: &TlsPaths) -> Result<Material, TlsError> {
        Self::from_contents(paths, &Contents::read(paths)?)
    }

    /// Checks files already read.
    pub fn from_contents(paths: &TlsPaths, c: &Contents) -> Result<Material, TlsError> {
        let ca = certs_in(&paths.ca, &c.ca)?;
        let Identity { chain, key, leaf } = identity_in(&paths.cert, &c.cert, &paths.key, &c.key)?;
        Ok(Material {
            ca,
            chain,
            key,
            leaf,
            paths: paths.clone(),
        })
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| TlsError::Certificate {
                path: self.paths.ca.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(roots)
    }
}

/// The crypto provider (ring), TLS 1.3 only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The controller's configuration: its certificate, and a client certificate
/// signed by the CA bundle required of every client.
pub fn server_config(m: &Material) -> Result<ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(m.roots()?),
        provider(),
    )
    .build()
    .map_err(|source| TlsError::Verifier {
        path: m.paths.ca.clone(),
        source,
    })?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(c)
}

/// The agent's configuration: the CA bundle that signed the controller's
/// certificate, and its own certificate, which must name `node` when given.
pub fn client_config(m: &Material, node: Option<&str>) -> Result<ClientConfig, TlsError> {
    if let Some(want) = node {
        let found = m.leaf.node().map_err(|source| TlsError::Identity {
            path: m.paths.cert.clone(),
            source,
        })?;
        if found != want {
            return Err(TlsError::WrongNode {
                path: m.paths.cert.clone(),
                found,
                want: want.to_string(),
            });
        }
    }
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(m.roots()?)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn material_is_checked_and_described() {
        let dir = certs::tests::scratch("material");
        let b = certs::Bundle::write(&dir, &["node-a"], &["localhost"], certs::Validity::days(1))
            .unwrap();
        let m = Material::read(&b.node_paths("node-a")).unwrap();
        assert_eq!(m.leaf.node(), Ok("node-a".into()));
        assert!(m.leaf.renew_at() > m.leaf.not_before && m.leaf.renew_at() < m.leaf.not_after);
        client_config(&m, Some("node-a")).unwrap();
        let e = client_config(&m, Some("node-b")).unwrap_err().to_string();
        assert!(
            e.contains("names node \"node-a\", but this agent is node \"node-b\""),
            "{e}"
        );
        let c = Material::read(&b.controller_paths()).unwrap();
        assert!(c.leaf.names.iter().any(|n| n == "localhost"));
        server_config(&c).unwrap();

        // Another pair's key: refused.
        let mut p = b.node_paths("node-a");
        p.key = b.controller_paths().key;
        let e = Material::read(&p).unwrap_err().to_string();
        assert!(e.contains("the key does not match the certificate"), "{e}");
        // A half-written certificate: refused.
        let pem = std::fs::read_to_string(&b.node_paths("node-a").cert).unwrap();
        let half = dir.join("half.pem");
        std::fs::write(&half, &pem[..pem.len() / 2]).unwrap();
        let mut p = b.node_paths("node-a");
        p.cert = half;
        let e = Material::read(&p).unwrap_err().to_string();
        assert!(e.contains("half.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
