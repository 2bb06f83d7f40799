//! The agent's side of the controller stream (`--controller URL`).
//!
//! [`follow`] keeps one `Watch` stream open to the controller: it says Hello
//! with the node name, turns each snapshot or delta into the node's whole
//! desired state ([`lb_api::wire::apply_message`]), hands it to the run loop
//! to apply, and acks the version with the outcome. When the controller goes
//! away, the data path keeps its last state; `follow` reconnects with a
//! backoff (100 ms doubling to 5 s) and resyncs from the fresh snapshot.
//!
//! TLS (docs/security.md): `https://` URLs connect with mutual TLS through
//! [`lb_api::tls::client::TlsConnector`], with the configuration current
//! at each attempt (its files are followed by an `lb_api::tls::reload::Reloader`).
//! The stream is restarted, at once and without a backoff, when new
//! certificate files are loaded, and once at two thirds of the presented
//! certificate's lifetime (cert-manager renews there; a renewal the file poll
//! missed is picked up then); the data path keeps serving meanwhile.
//! `http://` is plaintext; the binary allows it only with `--insecure`.
//!
//! Each service of a message is checked on its own: one that fails the
//! checks, or that a data path cannot take (a full map), is refused alone
//! and listed in the ack (`Ack.refused`); the agent keeps that service's
//! previous version, applies the rest, and counts the version as its own.
//! Only a message that cannot be read as a whole (a delta from another
//! version) is acked with an error and restarts the stream, which brings a
//! full snapshot.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lb_api::Refusal;
use lb_api::tls::ClientConfig;
use lb_api::tls::client::{ControllerUrl, Scheme, TlsConnector};
use lb_api::tls::reload::Loaded;
use lb_api::wire::{self, NodeState, pb};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

/// A new desired state for the run loop; it answers on `done`.
#[derive(Debug)]
pub struct Update {
    pub version: u64,
    pub state: NodeState,
    /// Whether this is a snapshot (the first state of a stream).
    pub snapshot: bool,
    /// Services of the message that the stream could not read (`state`
    /// keeps their previous versions).
    pub refused: Vec<Refusal>,
    /// The apply's outcome: the services refused in all, or why nothing
    /// could be applied.
    pub done: oneshot::Sender<Result<Vec<Refusal>, String>>,
}

/// What the metrics and logs show of the stream.
#[derive(Debug, Default)]
pub struct StreamStatus {
    pub connected: std::sync::atomic::AtomicBool,
    pub version: std::sync::atomic::AtomicU64,
    pub reconnects: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
    /// Streams restarted to present a new certificate.
    pub cert_rotations: std::sync::atomic::AtomicU64,
    /// When the presented client certificate expires (Unix seconds; 0: none).
    pub cert_not_after: std::sync::atomic::AtomicU64,
}

/// The agent's TLS configuration as its files change.
pub type ClientTls = tokio::sync::watch::Receiver<Arc<Loaded<ClientConfig>>>;

/// Where and who.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub url: String,
    pub node: String,
    pub connect_timeout: Duration,
    pub backoff_max: Duration,
    /// Required by `https://` URLs.
    pub tls: Option<ClientTls>,
}

impl StreamOptions {
    pub fn new(url: impl Into<String>, node: impl Into<String>) -> Self {
        StreamOptions {
            url: url.into(),
            node: node.into(),
            connect_timeout: Duration::from_secs(2),
            backoff_max: Duration::from_secs(5),
            tls: None,
        }
    }

    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// Errors that end one stream (the next attempt follows after a backoff).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("controller URL {0:?}: {1}")]
    Url(String, String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("stream: {0}")]
    Status(String),
    #[error("the controller sent a state the agent refuses: {0}")]
    Refused(#[from] wire::WireError),
    #[error("the run loop is gone")]
    LoopGone,
    /// Not an error: the stream restarts to present another certificate.
    #[error("{0}")]
    Rotate(String),
}

/// Follows the controller until `stop` turns true.
pub async fn follow(
    opts: StreamOptions,
    updates: mpsc::Sender<Update>,
    status: Arc<StreamStatus>,
    mut stop: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut backoff = Duration::from_millis(100);
    // The state and version this agent holds, across streams.
    let mut have = (0u64, NodeState::default());
    // The certificate generation already restarted for at 2/3 of its life.
    let mut renewed = 0u64;
    loop {
        let presented = opts.tls.as_ref().map(|t| t.borrow().clone());
        if let Some(p) = &presented {
            status
                .cert_not_after
                .store(p.leaf.not_after_unix(), Relaxed);
        }
        let r = tokio::select! {
            r = one_stream(&opts, presented.as_deref(), &updates, &status, &mut have) => r,
            why = rotation(&opts, presented.as_ref(), &mut renewed) => Err(StreamError::Rotate(why)),
            _ = stop.wait_for(|s| *s) => return,
        };
        status.connected.store(false, Relaxed);
        match r {
            Ok(got_any) => {
                info!(url = opts.url, "controller closed the stream; reconnecting");
                if got_any {
                    backoff = Duration::from_millis(100);
                }
            }
            Err(StreamError::LoopGone) => return,
            Err(StreamError::Rotate(why)) => {
                info!("{why}; reconnecting to present it (the data path keeps serving)");
                status.cert_rotations.fetch_add(1, Relaxed);
                status.reconnects.fetch_add(1, Relaxed);
                backoff = Duration::from_millis(100);
                continue;
            }
            Err(e) => {
                status.errors.fetch_add(1, Relaxed);
                warn!("controller stream: {e}; keeping the current state, retrying in {backoff:?}");
            }
        }
        status.reconnects.fetch_add(1, Relaxed);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            // New certificate files end the wait: they may be the fix.
            () = files_changed(&opts, presented.as_ref()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

/// Resolves when a configuration other than `presented` is loaded.
async fn files_changed(opts: &StreamOptions, presented: Option<&Arc<Loaded<ClientConfig>>>) {
    if let (Some(tls), Some(p)) = (&opts.tls, presented) {
        let mut rx = tls.clone();
        if rx.wait_for(|l| l.generation != p.generation).await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Resolves when the stream should restart with another certificate: new
/// files were loaded, or the presented one reached two thirds of its life
/// (once per certificate). Never, without TLS.
async fn rotation(
    opts: &StreamOptions,
    presented: Option<&Arc<Loaded<ClientConfig>>>,
    renewed: &mut u64,
) -> String {
    let (Some(tls), Some(p)) = (&opts.tls, presented) else {
        return std::future::pending().await;
    };
    let mut rx = tls.clone();
    let renew_in = if *renewed == p.generation {
        None
    } else {
        match p.leaf.renew_at().duration_since(SystemTime::now()) {
            Ok(d) => Some(d),
            Err(_) => {
                // Already past: say so once, then leave it to the files.
                *renewed = p.generation;
                warn!(
                    serial = p.leaf.serial,
                    not_after = p.leaf.not_after_unix(),
                    "the client certificate is past two thirds of its lifetime and no new one \
                     has been written; the controller ends the stream when it expires"
                );
                None
            }
        }
    };
    let renew = async {
        match renew_in {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = async {
            rx.wait_for(|l| l.generation != p.generation)
                .await
                .map(|l| (l.leaf.serial.clone(), l.leaf.not_after_unix()))
        } => match r {
            Ok((serial, not_after)) => {
                format!("new client certificate (serial {serial}, valid until {not_after})")
            }
            // The reloader is gone (shutting down): nothing to rotate to.
            Err(_) => std::future::pending().await,
        },
        () = renew => {
            *renewed = p.generation;
            format!(
                "the client certificate (serial {}) is two thirds through its lifetime",
                p.leaf.serial
            )
        }
    }
}

/// One stream, from connect to its end. `Ok(true)` when it delivered at least
/// one state before the controller closed it.
async fn one_stream(
    opts: &StreamOptions,
    presented: Option<&Loaded<ClientConfig>>,
    updates: &mpsc::Sender<Update>,
    status: &StreamStatus,
    have: &mut (u64, NodeState),
) -> Result<bool, StreamError> {
    use std::sync::atomic::Ordering::Relaxed;
    let bad_url = |why: String| StreamError::Url(opts.url.clone(), why);
    let url = ControllerUrl::parse(&opts.url).map_err(|e| bad_url(e.to_string()))?;
    let ep = Endpoint::from_shared(url.transport_uri())
        .map_err(|e| bad_url(e.to_string()))?
        .connect_timeout(opts.connect_timeout)
        // A controller that vanishes without a FIN is noticed within ~15 s.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connected = match (url.scheme, presented) {
        (Scheme::Tls, Some(tls)) => {
            let origin = opts
                .url
                .parse()
                .map_err(|e: http::uri::InvalidUri| bad_url(e.to_string()))?;
            let connector = TlsConnector::new(
                tls.config.clone(),
                url.server_name().map_err(|e| bad_url(e.to_string()))?,
            );
            ep.origin(origin).connect_with_connector(connector).await
        }
        (Scheme::Tls, None) => {
            return Err(bad_url(
                "https:// needs the TLS files: --tls-ca, --tls-cert and --tls-key".into(),
            ));
        }
        (Scheme::Plain, _) => ep.connect().await,
    };
    let channel =
        connected.map_err(|e| StreamError::Connect(opts.url.clone(), source_chain(&e)))?;
    let mut client = wire::StateStreamClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(8);
    out_tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                node: opts.node.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                applied_version: have.0,
            })),
        })
        .await
        .map_err(|_| StreamError::Status("outbound channel closed".into()))?;
    let mut inbound = client
        .watch(ReceiverStream::new(out_rx))
        .await
        .map_err(|s| StreamError::Status(status_text(&s) + &refused_hint(&s, presented)))?
        .into_inner();
    status.connected.store(true, Relaxed);
    match presented {
        Some(p) => info!(
            url = opts.url,
            node = opts.node,
            identity = lb_api::tls::node_uri(&opts.node),
            cert_serial = p.leaf.serial,
            cert_not_after = p.leaf.not_after_unix(),
            "connected to the controller (mutual TLS)"
        ),
        None => info!(
            url = opts.url,
            node = opts.node,
            "connected to the controller (plaintext)"
        ),
    }
    let mut first = true;
    let mut got_any = false;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(got_any),
            Err(s) => return Err(StreamError::Status(status_text(&s))),
        };
        let is_snapshot = matches!(msg.body, Some(pb::controller_message::Body::Snapshot(_)));
        if first && !is_snapshot {
            return Err(StreamError::Status(
                "the first message was not a snapshot".into(),
            ));
        }
        first = false;
        let next = match wire::apply_message(&have.1, have.0, &msg) {
            Ok(n) => n,
            Err(e) => {
                let _ = out_tx.send(ack(msg.version, Err(e.to_string()))).await;
                return Err(e.into());
            }
        };
        let (done, answer) = oneshot::channel();
        updates
            .send(Update {
                version: msg.version,
                state: next.state.clone(),
                snapshot: is_snapshot,
                refused: next.refused,
                done,
            })
            .await
            .map_err(|_| StreamError::LoopGone)?;
        let result = answer.await.map_err(|_| StreamError::LoopGone)?;
        *have = (msg.version, next.state);
        got_any = true;
        status.version.store(msg.version, Relaxed);
        debug!(version = msg.version, ok = result.is_ok(), "applied");
        if out_tx.send(ack(msg.version, result)).await.is_err() {
            return Err(StreamError::Status("outbound channel closed".into()));
        }
    }
}

fn ack(version: u64, result: Result<Vec<Refusal>, String>) -> pb::AgentMessage {
    let (error, refused) = match result {
        Ok(r) => (String::new(), wire::refusals_to_pb(&r)),
        Err(e) => (e, Vec::new()),
    };
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
            version,
            error,
            refused,
        })),
    }
}

/// Over TLS 1.3 the controller checks the client certificate after the
/// handshake looks done to the client, so a refused certificate shows as a
/// stream cut short: say what may be wrong.
fn refused_hint(s: &tonic::Status, presented: Option<&Loaded<ClientConfig>>) -> String {
    let Some(p) = presented else {
        return String::new();
    };
    if !matches!(
        s.code(),
        tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable
    ) {
        return String::new();
    }
    if SystemTime::now() > p.leaf.not_after {
        format!(
            " (this node's certificate, serial {}, expired at {} (Unix time); write a new one)",
            p.leaf.serial,
            p.leaf.not_after_unix()
        )
    } else {
        " (the controller may have refused this node's certificate: signed by a CA it does \
         not trust? its log says `TLS handshake refused`)"
            .to_string()
    }
}

fn status_text(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// A transport error's message with its causes ("transport error: ...: Connection refused").
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    lb_api::errors::one_line(std::iter::successors(Some(e), |e| e.source()))
}
