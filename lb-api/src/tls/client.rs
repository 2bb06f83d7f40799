//! The agent's side: the controller URL's rules and a TLS connector for
//! `tonic`'s `Endpoint::connect_with_connector`.
//!
//! `https://` means TLS or fail: the connector does TCP then a TLS 1.3
//! handshake with the configuration it was given (the agent builds one per
//! connection attempt from the current files), and verifies the
//! controller's certificate against the URL's host. `http://` is plaintext,
//! allowed only with `--insecure`; the agent checks that before it gets here.
//!
//! The endpoint handed to tonic says `http://` (the TLS is ours, below
//! tonic) with the `https://` URL as the requests' origin, so tonic's own
//! scheme handling never sees `https`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// How the agent reaches the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `https://`: mutual TLS.
    Tls,
    /// `http://`: plaintext (`--insecure`).
    Plain,
}

/// A parsed controller URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerUrl {
    pub url: String,
    pub scheme: Scheme,
    /// Host name or address, without brackets.
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("controller URL {0:?}: {1}")]
    Invalid(String, String),
}

impl ControllerUrl {
    pub fn parse(url: &str) -> Result<ControllerUrl, UrlError> {
        let bad = |why: &str| UrlError::Invalid(url.to_string(), why.to_string());
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::Tls,
            Some("http") => Scheme::Plain,
            Some(s) => {
                return Err(bad(&format!(
                    "scheme {s:?}: use https:// (or http:// with --insecure)"
                )));
            }
            None => {
                return Err(bad(
                    "no scheme: use https://HOST:PORT (or http:// with --insecure)",
                ));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(match scheme {
            Scheme::Tls => 443,
            Scheme::Plain => 80,
        });
        Ok(ControllerUrl {
            url: url.to_string(),
            scheme,
            host,
            port,
        })
    }

    /// The name the controller's certificate must carry (a DNS name or IP address).
    pub fn server_name(&self) -> Result<ServerName<'static>, UrlError> {
        ServerName::try_from(self.host.clone())
            .map_err(|e| UrlError::Invalid(self.url.clone(), format!("host {:?}: {e}", self.host)))
    }

    /// `http://host:port`: what tonic connects to (TLS, if any, is the connector's).
    pub fn transport_uri(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Tcp {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}{hint}")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("{addr} did not agree on HTTP/2 (ALPN h2)")]
    NoH2 { addr: String },
}

/// Said when the peer did not speak TLS at all.
const PLAINTEXT_HINT: &str = " (the controller did not answer in TLS: is it a plaintext controller? \
     That needs http:// and --insecure on both sides)";

fn hint(e: &io::Error) -> &'static str {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. },
        ) => PLAINTEXT_HINT,
        None if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::InvalidData
        ) =>
        {
            PLAINTEXT_HINT
        }
        _ => "",
    }
}

/// TCP, then TLS with one configuration; for `connect_with_connector`.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsConnector {
    pub fn new(config: Arc<ClientConfig>, server_name: ServerName<'static>) -> Self {
        TlsConnector {
            config,
            server_name,
        }
    }

    /// One connection to `host:port`.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|source| ConnectError::Tcp {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: addr.clone(),
                hint: hint(&source),
                source,
            })?;
        if tls.get_ref().1.alpn_protocol() != Some(super::ALPN_H2) {
            return Err(ConnectError::NoH2 { addr });
        }
        Ok(tls)
    }
}

type ConnectFuture = Pin<
    Box<
        dyn Future<
                Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, ConnectError>,
            > + Send,
    >,
>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            this.connect(&host, port).await.map(TokioIo::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = ControllerUrl::parse("https://rpclb-controller.rpclb-system.svc:50551").unwrap();
        assert_eq!(u.scheme, Scheme::Tls);
        assert_eq!(u.port, 50551);
        assert_eq!(
            u.transport_uri(),
            "http://rpclb-controller.rpclb-system.svc:50551"
        );
        u.server_name().unwrap();
        let u = ControllerUrl::parse("http://127.0.0.1:1").unwrap();
        assert_eq!((u.scheme, u.host.as_str()), (Scheme::Plain, "127.0.0.1"));
        let u = ControllerUrl::parse("https://[::1]:9").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.transport_uri(), "http://[::1]:9");
        assert!(ControllerUrl::parse("grpc://x:1").is_err());
        assert!(ControllerUrl::parse("x:1").is_err());
    }
}
