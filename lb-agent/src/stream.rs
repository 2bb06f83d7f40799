//! The agent's side of the controller stream (`--controller URL`).
//!
//! [`follow`] keeps one `Watch` stream open to the controller: it says Hello
//! with the node name, turns each snapshot or delta into the node's whole
//! desired state ([`lb_api::wire::apply_message`]), hands it to the run loop
//! to apply, and acks the version with the outcome. When the controller goes
//! away, the data path keeps its last state; `follow` reconnects with a
//! backoff (100 ms doubling to 5 s) and resyncs from the fresh snapshot.
//!
//! Each service of a message is checked on its own: one that fails the
//! checks, or that a data path cannot take (a full map), is refused alone
//! and listed in the ack (`Ack.refused`); the agent keeps that service's
//! previous version, applies the rest, and counts the version as its own.
//! Only a message that cannot be read as a whole (a delta from another
//! version) is acked with an error and restarts the stream, which brings a
//! full snapshot.

use std::sync::Arc;
use std::time::Duration;

use lb_api::Refusal;
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
}

/// Where and who.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub url: String,
    pub node: String,
    pub connect_timeout: Duration,
    pub backoff_max: Duration,
}

impl StreamOptions {
    pub fn new(url: impl Into<String>, node: impl Into<String>) -> Self {
        StreamOptions {
            url: url.into(),
            node: node.into(),
            connect_timeout: Duration::from_secs(2),
            backoff_max: Duration::from_secs(5),
        }
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
    loop {
        let r = tokio::select! {
            r = one_stream(&opts, &updates, &status, &mut have) => r,
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
            Err(e) => {
                status.errors.fetch_add(1, Relaxed);
                warn!("controller stream: {e}; keeping the current state, retrying in {backoff:?}");
            }
        }
        status.reconnects.fetch_add(1, Relaxed);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

/// One stream, from connect to its end. `Ok(true)` when it delivered at least
/// one state before the controller closed it.
async fn one_stream(
    opts: &StreamOptions,
    updates: &mpsc::Sender<Update>,
    status: &StreamStatus,
    have: &mut (u64, NodeState),
) -> Result<bool, StreamError> {
    use std::sync::atomic::Ordering::Relaxed;
    let ep = Endpoint::from_shared(opts.url.clone())
        .map_err(|e| StreamError::Url(opts.url.clone(), e.to_string()))?
        .connect_timeout(opts.connect_timeout)
        // A controller that vanishes without a FIN is noticed within ~15 s.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = ep
        .connect()
        .await
        .map_err(|e| StreamError::Connect(opts.url.clone(), source_chain(&e)))?;
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
        .map_err(|s| StreamError::Status(status_text(&s)))?
        .into_inner();
    status.connected.store(true, Relaxed);
    info!(
        url = opts.url,
        node = opts.node,
        "connected to the controller"
    );
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
