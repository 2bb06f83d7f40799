//! The checks themselves: a TCP connect, or `grpc.health.v1.Health/Check`
//! over HTTP/2, on a new connection each time (it also proves that the
//! backend accepts connections). The gRPC check speaks h2c, or TLS (ALPN
//! h2) to the backends of a service with `grpc.tls.upstream`, with the
//! proxy's own backend TLS settings.
//!
//! The health messages are hand-encoded (one field each) rather than taken
//! from the tonic-health crate, which is not in the lock file and would add
//! a generated proto for two one-field messages:
//! `HealthCheckRequest { string service = 1; }`,
//! `HealthCheckResponse { ServingStatus status = 1; }` (SERVING = 1).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_api::tls::rustls::ClientConfig;
use lb_api::tls::rustls::pki_types::ServerName;
use lb_api::{HealthCheck, HealthCheckKind};
use tokio::io::{AsyncRead, AsyncWrite};

/// The path of the gRPC health check.
pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// `ServingStatus.SERVING`.
const SERVING: u64 = 1;
/// The largest health response read.
const MAX_RESPONSE: usize = 4096;

/// Why a check failed (for debug logs).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Failure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP/2: {0}")]
    Http(String),
    #[error("HTTP status {0}")]
    HttpStatus(u16),
    #[error("grpc-status {0}")]
    GrpcStatus(String),
    #[error("serving status {0} (not SERVING)")]
    NotServing(u64),
    #[error("malformed health response")]
    Malformed,
}

/// The TLS of a gRPC check: the configuration and the name verified.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Runs one check of `backend` (gRPC checks over `tls` when given),
/// bounded by the check's timeout.
pub async fn check(
    hc: &HealthCheck,
    backend: SocketAddr,
    tls: Option<&Tls>,
) -> Result<(), Failure> {
    let run = async {
        let tcp = tokio::net::TcpStream::connect(backend)
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        match (hc.kind, tls) {
            (HealthCheckKind::Tcp, _) => Ok(()),
            (HealthCheckKind::Grpc, None) => grpc_check(tcp, backend, &hc.service).await,
            (HealthCheckKind::Grpc, Some(t)) => {
                let s = tokio_rustls::TlsConnector::from(t.config.clone())
                    .connect(t.name.clone(), tcp)
                    .await
                    .map_err(|e| {
                        let inner = e
                            .get_ref()
                            .and_then(|i| i.downcast_ref::<lb_api::tls::rustls::Error>());
                        Failure::Tls(inner.map_or_else(|| e.to_string(), ToString::to_string))
                    })?;
                grpc_check(s, backend, &hc.service).await
            }
        }
    };
    match tokio::time::timeout(hc.timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout(hc.timeout)),
    }
}

async fn grpc_check<T>(tcp: T, backend: SocketAddr, service: &str) -> Result<(), Failure>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| Failure::Http(e.to_string());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(http)?;
    // The connection ends when `send` and the response are dropped.
    let conn = tokio::spawn(conn);
    let req = http::Request::post(format!("http://{backend}{CHECK_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "rpclb-health")
        .body(OneChunk(Some(encode_request(service))))
        .map_err(|e| Failure::Http(e.to_string()))?;
    let resp = send.send_request(req).await.map_err(http);
    let r = match resp {
        Ok(resp) => read_response(resp).await,
        Err(e) => Err(e),
    };
    drop(send);
    conn.abort();
    r
}

async fn read_response(resp: http::Response<hyper::body::Incoming>) -> Result<(), Failure> {
    if resp.status() != http::StatusCode::OK {
        return Err(Failure::HttpStatus(resp.status().as_u16()));
    }
    let (parts, mut body) = resp.into_parts();
    // Trailers-only: the status is in the headers, and no message follows.
    if let Some(s) = parts.headers.get("grpc-status") {
        return Err(Failure::GrpcStatus(
            String::from_utf8_lossy(s.as_bytes()).into_owned(),
        ));
    }
    let mut data = BytesMut::new();
    let mut status = None;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| Failure::Http(e.to_string()))?;
        if let Some(d) = frame.data_ref() {
            if data.len() + d.len() > MAX_RESPONSE {
                return Err(Failure::Malformed);
            }
            data.extend_from_slice(d);
        } else if let Some(t) = frame.trailers_ref() {
            status = t.get("grpc-status").map(|v| v.as_bytes().to_vec());
        }
    }
    match status.as_deref() {
        Some(b"0") => {}
        Some(s) => return Err(Failure::GrpcStatus(String::from_utf8_lossy(s).into_owned())),
        None => return Err(Failure::Malformed),
    }
    match decode_response(&data) {
        Some(SERVING) => Ok(()),
        Some(s) => Err(Failure::NotServing(s)),
        None => Err(Failure::Malformed),
    }
}

/// A length-prefixed `HealthCheckRequest` (not compressed).
pub fn encode_request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    Bytes::from(out)
}

/// The `status` of a length-prefixed `HealthCheckResponse` (0, UNKNOWN,
/// when absent); `None` when malformed or compressed.
pub fn decode_response(data: &[u8]) -> Option<u64> {
    let (&flag, rest) = data.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let mut status = 0;
    while !msg.is_empty() {
        let key = get_varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(&mut msg)?,
            // Skip unknown fields of the known wire types.
            (_, 0) => {
                get_varint(&mut msg)?;
            }
            (_, 1) => msg = msg.get(8..)?,
            (_, 2) => {
                let n = get_varint(&mut msg)? as usize;
                msg = msg.get(n..)?;
            }
            (_, 5) => msg = msg.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// A request body of one chunk.
struct OneChunk(Option<Bytes>);

impl Body for OneChunk {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding() {
        assert_eq!(&encode_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &encode_request("a.B")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
        );
    }

    #[test]
    fn response_decoding() {
        assert_eq!(decode_response(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(decode_response(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        // Empty message: UNKNOWN (0).
        assert_eq!(decode_response(&[0, 0, 0, 0, 0]), Some(0));
        // An unknown string field before the status is skipped.
        assert_eq!(
            decode_response(&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1]),
            Some(1)
        );
        // Compressed, truncated, or a bad varint.
        assert_eq!(decode_response(&[1, 0, 0, 0, 2, 0x08, 1]), None);
        assert_eq!(decode_response(&[0, 0, 0, 0, 3, 0x08, 1]), None);
        assert_eq!(decode_response(&[0, 0, 0, 0, 2, 0x08, 0x80]), None);
    }
}
