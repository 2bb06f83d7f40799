//! The gRPC mode's per-service TLS (`grpc.tls` in the model): rustls
//! configurations built from the service's files, followed by a
//! [`Reloader`]. The agent's proxy (listener and backend connections) and
//! its health checks both build theirs here.
//!
//! - Listener ([`listen_reloader`]): the certificate chain and key; with
//!   `client_ca`, a client certificate signed by that bundle is required
//!   (mutual TLS). ALPN offers `h2` only.
//! - Backends ([`upstream_reloader`]): the CA bundle that verifies the
//!   backends' certificates, and optionally a client certificate. ALPN
//!   offers `h2` only. The name verified is chosen per connection
//!   ([`upstream_name`]).
//!
//! Protocol versions: rustls's defaults as built (TLS 1.3, and 1.2 when
//! the build has rustls's `tls12` feature); the ring provider, as for the
//! controller stream.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};

use super::reload::Reloader;
use super::{ALPN_H2, TlsError, identity_in, provider, roots_in};
use crate::model::{ListenTls, UpstreamTls};

/// Follows a listener's files: `[cert, key, client_ca?]`. A missing or bad
/// file is an error (the caller refuses the service).
pub fn listen_reloader(l: &ListenTls) -> Result<Reloader<ServerConfig>, TlsError> {
    let cert = PathBuf::from(&l.cert);
    let key = PathBuf::from(&l.key);
    let ca = l.client_ca.as_ref().map(PathBuf::from);
    let mut files = vec![cert.clone(), key.clone()];
    files.extend(ca.clone());
    Reloader::files(files, cert.clone(), move |b| {
        let id = identity_in(&cert, &b[0], &key, &b[1])?;
        let versions = rustls::DEFAULT_VERSIONS;
        let builder =
            ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
        let builder = match &ca {
            Some(path) => {
                let (roots, _) = roots_in(path, &b[2])?;
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: path.clone(),
                    source,
                })?;
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        let mut c = builder.with_single_cert(id.chain, id.key)?;
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok((c, id.leaf))
    })
}

/// Follows the files of the TLS to backends: `[ca, cert?, key?]`. A missing
/// or bad file is an error (the caller refuses the service). The leaf shown
/// is the client certificate's, or the CA's when there is none.
pub fn upstream_reloader(u: &UpstreamTls) -> Result<Reloader<ClientConfig>, TlsError> {
    let ca = PathBuf::from(&u.ca);
    let pair = match (&u.cert, &u.key) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        _ => None,
    };
    let mut files = vec![ca.clone()];
    if let Some((c, k)) = &pair {
        files.push(c.clone());
        files.push(k.clone());
    }
    let shown = pair.as_ref().map_or_else(|| ca.clone(), |(c, _)| c.clone());
    Reloader::files(files, shown, move |b| {
        let (roots, ca_info) = roots_in(&ca, &b[0])?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
            .with_root_certificates(roots);
        let (mut c, leaf) = match &pair {
            Some((cert, key)) => {
                let id = identity_in(cert, &b[1], key, &b[2])?;
                (builder.with_client_auth_cert(id.chain, id.key)?, id.leaf)
            }
            None => (builder.with_no_client_auth(), ca_info),
        };
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok((c, leaf))
    })
}

/// The name to verify in a backend's certificate (and send as SNI): the
/// configured `server_name`, else the backend's IP address. `None` only
/// for a `server_name` that validation would refuse.
pub fn upstream_name(u: &UpstreamTls, backend: impl Into<IpAddr>) -> Option<ServerName<'static>> {
    match &u.server_name {
        Some(n) => ServerName::try_from(n.clone()).ok(),
        None => Some(ServerName::IpAddress(backend.into().into())),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::certs::{Bundle, Validity, tests::scratch, write_atomic};
    use super::super::reload::Polled;
    use super::*;

    #[test]
    fn listener_and_upstream_sets_load_and_reload() {
        let dir = scratch("grpc-service");
        let b = Bundle::write(&dir, &["node-a"], &[], Validity::days(1)).unwrap();
        let ctl = b.controller_paths();
        let s = |p: &std::path::Path| p.display().to_string();
        let l = ListenTls {
            cert: s(&ctl.cert),
            key: s(&ctl.key),
            client_ca: None,
        };
        let mut r = listen_reloader(&l).unwrap();
        assert_eq!(r.current().config.alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(r.paths().len(), 2);
        // With client_ca: three files, and a verifier.
        let m = ListenTls {
            client_ca: Some(s(&ctl.ca)),
            ..l.clone()
        };
        assert_eq!(listen_reloader(&m).unwrap().paths().len(), 3);
        // A missing file: refused, naming it.
        let gone = ListenTls {
            key: s(&dir.join("nope.pem")),
            ..l.clone()
        };
        let e = listen_reloader(&gone).unwrap_err().to_string();
        assert!(e.contains("nope.pem") && e.contains("cannot read"), "{e}");
        // A new pair is taken; a mismatched one is kept out.
        let ca = b.load_ca().unwrap();
        let first = r.current().leaf.serial.clone();
        b.write_controller(&ca, &[], Validity::days(1)).unwrap();
        assert_eq!(r.poll(), Polled::Reloaded);
        assert_ne!(r.current().leaf.serial, first);
        let other = ca.controller(&["x".into()], Validity::days(1)).unwrap();
        write_atomic(&ctl.key, &other.key_pem, true).unwrap();
        assert!(matches!(r.poll(), Polled::Invalid(e) if e.contains("does not match")));

        // Upstream: the CA alone (the CA's facts shown), or with a client pair.
        let np = b.node_paths("node-a");
        let u = UpstreamTls {
            ca: s(&np.ca),
            server_name: None,
            cert: None,
            key: None,
        };
        let r = upstream_reloader(&u).unwrap();
        assert!(r.current().leaf.subject.contains("rpclb CA"));
        let u2 = UpstreamTls {
            cert: Some(s(&np.cert)),
            key: Some(s(&np.key)),
            ..u.clone()
        };
        let r = upstream_reloader(&u2).unwrap();
        assert_eq!(r.current().leaf.node().as_deref(), Ok("node-a"));
        let ip = Ipv4Addr::new(10, 244, 1, 2);
        assert_eq!(
            upstream_name(&u, ip),
            Some(ServerName::IpAddress(IpAddr::V4(ip).into()))
        );
        let named = UpstreamTls {
            server_name: Some("api.shop.svc".into()),
            ..u
        };
        assert_eq!(
            upstream_name(&named, ip),
            Some(ServerName::try_from("api.shop.svc").unwrap())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
