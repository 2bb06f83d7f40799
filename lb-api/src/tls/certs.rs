//! Certificates for the lab, the demo and a first install
//! (`lb-controller certs`, `cargo xtask certs`): a CA, the controller's
//! serving certificate and one client certificate per node, with rcgen.
//!
//! The layout of a folder ([`Bundle`]):
//!
//! ```text
//! ca.pem  ca-key.pem                     the CA (keep ca-key.pem off the cluster)
//! controller.pem  controller-key.pem     serverAuth; SAN DNS/IP: CONTROLLER_NAMES + extra
//! node-<name>.pem  node-<name>-key.pem   clientAuth; SAN URI rpclb://node/<name>
//! ```
//!
//! Keys are ECDSA P-256, written mode 0600. Every file is written to a
//! temporary name and renamed into place, so a reader never sees half of one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::TlsPaths;
use super::identity::{NodeNameError, node_uri, validate_node_name};

/// The names the controller's certificate is valid for by default: the
/// Service of deploy/ and loopback (the demo, the tests, a port-forward).
pub const CONTROLLER_NAMES: &[&str] = &[
    "rpclb-controller",
    "rpclb-controller.rpclb-system",
    "rpclb-controller.rpclb-system.svc",
    "rpclb-controller.rpclb-system.svc.cluster.local",
    "localhost",
    "127.0.0.1",
];

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    NodeName(#[from] NodeNameError),
}

/// From when to when a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days(days: u64) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(days * 86_400),
        }
    }

    /// From now for `d` (short-lived certificates in tests).
    pub fn from_now(d: Duration) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now,
            not_after: now + d,
        }
    }

    fn apply(&self, p: &mut CertificateParams) {
        p.not_before = self.not_before.into();
        p.not_after = self.not_after.into();
    }
}

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA that signs the controller's and the nodes' certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str, v: Validity) -> Result<Ca, CertError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        v.apply(&mut p);
        let cert_pem = p.self_signed(&key)?.pem();
        let key_pem = key.serialize_pem();
        Ok(Ca {
            issuer: Issuer::new(p, key),
            cert_pem,
            key_pem,
        })
    }

    /// An existing CA (to add nodes to an install).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Ca {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// The controller's serving certificate, for `names` (DNS names or IP addresses).
    pub fn controller(&self, names: &[String], v: Validity) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names.to_vec())?;
        p.distinguished_name
            .push(DnType::CommonName, "rpclb-controller");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        v.apply(&mut p);
        Ok(Issued {
            cert_pem: p.signed_by(&key, &self.issuer)?.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A node's client certificate: SAN URI `rpclb://node/<node>`.
    pub fn node(&self, node: &str, v: Validity) -> Result<Issued, CertError> {
        validate_node_name(node)?;
        self.client_with_uris(node, &[node_uri(node)], v)
    }

    /// A client certificate with any SAN URIs (tests: none, several, a bad name).
    pub fn client_with_uris(
        &self,
        common_name: &str,
        uris: &[String],
        v: Validity,
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        for u in uris {
            p.subject_alt_names
                .push(SanType::URI(u.as_str().try_into()?));
        }
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        v.apply(&mut p);
        Ok(Issued {
            cert_pem: p.signed_by(&key, &self.issuer)?.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `text` to `path` through a temporary file and a rename; `secret`
/// files get mode 0600.
pub fn write_atomic(path: &Path, text: &str, secret: bool) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A folder of certificates in the layout above.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub dir: PathBuf,
}

impl Bundle {
    /// A new CA, the controller's certificate (for [`CONTROLLER_NAMES`] and
    /// `extra_names`) and one per node, written to `dir` (created).
    pub fn write(
        dir: &Path,
        nodes: &[&str],
        extra_names: &[&str],
        v: Validity,
    ) -> Result<Bundle, CertError> {
        let ca = Ca::new("rpclb CA", v)?;
        let b = Bundle::at(dir);
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(&b.ca_key(), &ca.key_pem, true)?;
        write_atomic(&b.ca(), &ca.cert_pem, false)?;
        b.write_controller(&ca, extra_names, v)?;
        for n in nodes {
            b.write_node(&ca, n, v)?;
        }
        Ok(b)
    }

    /// A folder that holds (or will hold) a bundle.
    pub fn at(dir: &Path) -> Bundle {
        Bundle {
            dir: dir.to_path_buf(),
        }
    }

    /// The CA written in this folder.
    pub fn load_ca(&self) -> Result<Ca, CertError> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|source| CertError::Io { path: p, source })
        };
        Ca::load(&read(self.ca())?, &read(self.ca_key())?)
    }

    /// (Re)writes the controller's certificate and key.
    pub fn write_controller(
        &self,
        ca: &Ca,
        extra_names: &[&str],
        v: Validity,
    ) -> Result<(), CertError> {
        let mut names: Vec<String> = CONTROLLER_NAMES.iter().map(|s| s.to_string()).collect();
        for n in extra_names {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
        let c = ca.controller(&names, v)?;
        let p = self.controller_paths();
        write_atomic(&p.key, &c.key_pem, true)?;
        write_atomic(&p.cert, &c.cert_pem, false)
    }

    /// (Re)writes a node's certificate and key.
    pub fn write_node(&self, ca: &Ca, node: &str, v: Validity) -> Result<(), CertError> {
        let c = ca.node(node, v)?;
        let p = self.node_paths(node);
        write_atomic(&p.key, &c.key_pem, true)?;
        write_atomic(&p.cert, &c.cert_pem, false)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    /// The controller's files: the CA bundle that signs agents, its certificate and key.
    pub fn controller_paths(&self) -> TlsPaths {
        TlsPaths {
            ca: self.ca(),
            cert: self.dir.join("controller.pem"),
            key: self.dir.join("controller-key.pem"),
        }
    }

    /// A node's files: the CA bundle that signs the controller, its certificate and key.
    pub fn node_paths(&self, node: &str) -> TlsPaths {
        TlsPaths {
            ca: self.ca(),
            cert: self.dir.join(format!("node-{node}.pem")),
            key: self.dir.join(format!("node-{node}-key.pem")),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh scratch folder.
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rpclb-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_bundle_has_a_ca_a_controller_and_nodes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("bundle");
        let b = Bundle::write(
            &dir,
            &["node-a", "node-b"],
            &["ctl.example"],
            Validity::days(2),
        )
        .unwrap();
        let c = super::super::Material::read(&b.controller_paths()).unwrap();
        assert!(c.leaf.names.iter().any(|n| n == "ctl.example"));
        assert!(c.leaf.names.iter().any(|n| n == "127.0.0.1"));
        assert_eq!(c.leaf.node(), Err(super::super::IdentityError::NoNode));
        for n in ["node-a", "node-b"] {
            let m = super::super::Material::read(&b.node_paths(n)).unwrap();
            assert_eq!(m.leaf.node().as_deref(), Ok(n));
            let mode = std::fs::metadata(b.node_paths(n).key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The CA adds a node later.
        let ca = b.load_ca().unwrap();
        b.write_node(&ca, "node-c", Validity::days(1)).unwrap();
        super::super::Material::read(&b.node_paths("node-c")).unwrap();
        assert!(ca.node("Bad_Name", Validity::days(1)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
