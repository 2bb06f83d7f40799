//! The gRPC stream to agents (`rpclb.v1.StateStream/Watch`).
//!
//! The controller publishes versioned states through a [`Publisher`]; each
//! agent's stream sends its node's state as a snapshot first, then a delta
//! for every published version that changes that node's state. Agents ack
//! every version; [`Agents`] keeps what each node last acked, for metrics and
//! logs.
//!
//! ```text
//! agent  --Hello{node}-->                 controller
//!        <--Snapshot v7--  --Ack v7-->
//!        <--Delta 7->9--   --Ack v9-->    (v8 did not change this node)
//! ```
//!
//! Who may watch what (docs/security.md): over mutual TLS, a stream is bound
//! to the node its client certificate names (SAN URI `rpclb://node/<name>`);
//! its Hello must name the same node, and its acks count for that node only
//! (an Ack carries no node: it belongs to its stream). Anything else is
//! refused before the node's status is touched, with PERMISSION_DENIED, and
//! counted by reason ([`StreamRefusals`]). A node may have at most
//! `max_streams_per_node` streams open at once (RESOURCE_EXHAUSTED beyond).
//! A stream ends when the client certificate that opened it expires. With
//! `--insecure` (plaintext) the Hello's node is taken as said, after the same
//! name checks.
//!
//! Flow control: a stream sends at most one message ahead of its acks' pace
//! only through the channel buffer; versions published while a send is
//! pending are coalesced into the next delta, so a slow agent gets fewer,
//! larger deltas, never an unbounded queue.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use lb_api::Refusal;
use lb_api::tls::server::PeerInfo;
use lb_api::wire::{self, NodeState, pb};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::codec::Codec;
use tonic::server::NamedService;
use tonic::{Request, Status, Streaming};
use tonic_prost::ProstCodec;
use tracing::{debug, info, warn};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one node may hold open at once by default: its current one and a
/// reconnect that arrives before the controller has seen the old one end.
pub const DEFAULT_MAX_STREAMS_PER_NODE: u32 = 2;

/// Why a stream (or a connection) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The TLS handshake failed: no client certificate, another CA, expired, not TLS.
    TlsHandshake,
    /// The client certificate names no node, several, or an invalid name.
    NoIdentity,
    /// The Hello names a node other than the certificate's.
    NodeMismatch,
    /// The Hello's node name is not a valid node name.
    InvalidNodeName,
    /// The first message was not a Hello, or none came in time.
    NoHello,
    /// The node already has its maximum of open streams.
    TooManyStreams,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 6] = [
        RefusalReason::TlsHandshake,
        RefusalReason::NoIdentity,
        RefusalReason::NodeMismatch,
        RefusalReason::InvalidNodeName,
        RefusalReason::NoHello,
        RefusalReason::TooManyStreams,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::TlsHandshake => "tls_handshake",
            RefusalReason::NoIdentity => "no_identity",
            RefusalReason::NodeMismatch => "node_mismatch",
            RefusalReason::InvalidNodeName => "invalid_node_name",
            RefusalReason::NoHello => "no_hello",
            RefusalReason::TooManyStreams => "too_many_streams",
        }
    }
}

/// Refused streams and connections, by reason.
#[derive(Debug, Default)]
pub struct StreamRefusals {
    counts: [AtomicU64; RefusalReason::ALL.len()],
}

impl StreamRefusals {
    pub fn count(&self, r: RefusalReason) {
        self.counts[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, r: RefusalReason) -> u64 {
        self.counts[r as usize].load(Ordering::Relaxed)
    }
}

/// One published version of every node's desired state.
///
/// States are immutable once published and shared (`Arc`): a state that did
/// not change keeps its `Arc` from one version to the next, and every stream
/// holds the `Arc` of what it last sent instead of a copy. The messages of
/// the default state (its snapshot, and its delta from the previous version)
/// are encoded once, and their bytes are shared by every stream that sends
/// them ([`WatchServer`]).
#[derive(Debug, Default)]
pub struct Published {
    pub version: u64,
    /// The state of a node without an entry in `nodes`.
    pub default: Arc<NodeState>,
    /// Nodes whose state differs from the default (e.g. services with
    /// `internalTrafficPolicy: Local`).
    pub nodes: BTreeMap<String, Arc<NodeState>>,
    /// The version before this one (0: none) and its default state, whose
    /// delta to this default is `default_delta`.
    prev: u64,
    prev_default: Weak<NodeState>,
    /// The change of the default state since `prev`, framed (`None`: no change).
    default_delta: Option<Bytes>,
    /// The default state's snapshot, framed on first use.
    default_snapshot: OnceLock<Bytes>,
}

impl Published {
    pub fn for_node(&self, node: &str) -> &Arc<NodeState> {
        self.nodes.get(node).unwrap_or(&self.default)
    }

    /// The framed snapshot of `state` (one of this version's states).
    fn snapshot_of(&self, state: &Arc<NodeState>) -> Bytes {
        if Arc::ptr_eq(state, &self.default) {
            return self
                .default_snapshot
                .get_or_init(|| frame(&wire::snapshot(self.version, state)))
                .clone();
        }
        frame(&wire::snapshot(self.version, state))
    }

    /// The framed delta from `old` (sent as `base`) to `new` (one of this
    /// version's states); `None` when nothing changed. The shared bytes when
    /// both are the default states of the previous and of this version.
    fn delta_to(&self, base: u64, old: &Arc<NodeState>, new: &Arc<NodeState>) -> Option<Bytes> {
        if Arc::ptr_eq(old, new) {
            return None;
        }
        if base == self.prev
            && Arc::ptr_eq(new, &self.default)
            && std::ptr::eq(Arc::as_ptr(old), self.prev_default.as_ptr())
        {
            return self.default_delta.clone();
        }
        wire::delta(base, old, self.version, new).map(|m| frame(&m))
    }
}

/// A message as gRPC frames it on the wire: a 5-byte prefix (not
/// compressed, length) and the protobuf bytes.
pub fn frame(msg: &pb::ControllerMessage) -> Bytes {
    let len = msg.encoded_len();
    let mut b = Vec::with_capacity(5 + len);
    b.push(0);
    b.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    msg.encode(&mut b).expect("a Vec grows as needed");
    Bytes::from(b)
}

/// Publishes new versions; streams follow.
///
/// Versions carry an epoch, so that two controllers (a restart, a new
/// leader) never number two states alike: the first version is the
/// millisecond of the first publish since the Unix epoch, shifted left by
/// [`wire::VERSION_SEQ_BITS`], plus 1; each change adds 1. A later
/// controller starts above every version an earlier one could have reached
/// (4,096 changes per millisecond of its life), and every version stays
/// below 2^53, exact in a metric's f64.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Arc<Published>>,
    /// The epoch for tests (`Some(0)`: versions 1, 2, 3...); `None`: the clock.
    epoch_ms: Option<u64>,
    /// One publish at a time (the diff is computed outside the channel's lock).
    publishing: Mutex<()>,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

impl Publisher {
    /// Starts at version 0 with an empty state. Streams wait for version 1
    /// before they send anything, so an agent never receives the empty
    /// placeholder as if it were the cluster's state.
    pub fn new() -> Self {
        Publisher {
            tx: watch::channel(Arc::new(Published::default())).0,
            epoch_ms: None,
            publishing: Mutex::new(()),
        }
    }

    /// As [`Publisher::new`], with a fixed epoch (tests: 0 numbers the
    /// versions 1, 2, 3...).
    pub fn with_epoch(epoch_ms: u64) -> Self {
        Publisher {
            epoch_ms: Some(epoch_ms),
            ..Self::new()
        }
    }

    /// Publishes a state. Returns its version; an unchanged state keeps the
    /// current version and wakes nobody. States equal to the current ones
    /// keep their `Arc`s, so that streams see at a glance what did not change.
    pub fn publish(&self, default: NodeState, nodes: BTreeMap<String, NodeState>) -> u64 {
        let nodes = nodes.into_iter().map(|(n, s)| (n, Arc::new(s))).collect();
        self.publish_shared(default, nodes)
    }

    /// As [`publish`](Self::publish), with node states that may be shared:
    /// nodes given the same `Arc` (e.g. every node of a zone) keep sharing
    /// one state, compared once with what they had.
    pub fn publish_shared(
        &self,
        default: NodeState,
        nodes: BTreeMap<String, Arc<NodeState>>,
    ) -> u64 {
        let _one = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current();
        let same_default = cur.version > 0 && *cur.default == default;
        // Each distinct (new, previous) pair of states is compared once: the
        // previous `Arc` is kept when equal.
        let mut same_nodes = cur.nodes.len() == nodes.len();
        let mut compared: HashMap<(*const NodeState, *const NodeState), bool> = HashMap::new();
        // Ok: the previous Arc, kept; Err: the new one.
        type Kept = Result<Arc<NodeState>, Arc<NodeState>>;
        let nodes: Vec<(String, Kept)> = nodes
            .into_iter()
            .map(|(n, s)| match cur.nodes.get(&n) {
                Some(c)
                    if *compared
                        .entry((Arc::as_ptr(&s), Arc::as_ptr(c)))
                        .or_insert_with(|| **c == *s) =>
                {
                    (n, Ok(c.clone()))
                }
                _ => {
                    same_nodes = false;
                    (n, Err(s))
                }
            })
            .collect();
        if same_default && same_nodes {
            return cur.version;
        }
        let version = if cur.version == 0 {
            let epoch = self.epoch_ms.unwrap_or_else(wire::now_epoch_ms);
            wire::first_version(epoch)
        } else {
            cur.version + 1
        };
        let default = if same_default {
            cur.default.clone()
        } else {
            Arc::new(default)
        };
        let mut is_default: HashMap<*const NodeState, bool> = HashMap::new();
        let nodes = nodes
            .into_iter()
            .map(|(n, s)| {
                let a = match s {
                    Ok(kept) => kept,
                    Err(s)
                        if *is_default
                            .entry(Arc::as_ptr(&s))
                            .or_insert_with(|| *s == *default) =>
                    {
                        default.clone()
                    }
                    Err(s) => s,
                };
                (n, a)
            })
            .collect();
        let default_delta = if cur.version > 0 && !same_default {
            wire::delta(cur.version, &cur.default, version, &default).map(|m| frame(&m))
        } else {
            None
        };
        self.tx.send_replace(Arc::new(Published {
            version,
            default,
            nodes,
            prev: cur.version,
            prev_default: Arc::downgrade(&cur.default),
            default_delta,
            default_snapshot: OnceLock::new(),
        }));
        version
    }

    pub fn current(&self) -> Arc<Published> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.tx.subscribe()
    }
}

/// What the controller knows of one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// Whether it has a stream open (`open > 0`).
    pub connected: bool,
    /// Its open streams.
    pub open: u32,
    /// The last version sent on the current (or last) stream.
    pub sent: u64,
    /// The last version the agent acked as applied.
    pub acked: u64,
    /// The agent's last apply error, if its last ack had one.
    pub error: Option<String>,
    /// The services its last ack refused (it applied the rest).
    pub refused: Vec<Refusal>,
    pub streams: u64,
    pub since: Instant,
}

/// Agents by node name.
#[derive(Debug, Default)]
pub struct Agents {
    by_node: Mutex<BTreeMap<String, AgentStatus>>,
}

impl Agents {
    pub fn snapshot(&self) -> BTreeMap<String, AgentStatus> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AgentStatus>> {
        self.by_node.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut AgentStatus)) {
        let mut m = self.lock();
        let s = m.entry(node.to_string()).or_insert(AgentStatus {
            connected: false,
            open: 0,
            sent: 0,
            acked: 0,
            error: None,
            refused: Vec::new(),
            streams: 0,
            since: Instant::now(),
        });
        f(s);
    }

    /// Counts a new stream of `node`, unless it has `max` open already.
    fn open_stream(self: &Arc<Self>, node: &str, max: u32) -> Option<OpenStream> {
        let mut ok = true;
        self.update(node, |s| {
            if s.open >= max {
                ok = false;
                return;
            }
            s.open += 1;
            s.connected = true;
            s.streams += 1;
            s.since = Instant::now();
        });
        ok.then(|| OpenStream {
            agents: self.clone(),
            node: node.to_string(),
        })
    }
}

/// One open stream of a node; closing it (drop) updates the node's status.
struct OpenStream {
    agents: Arc<Agents>,
    node: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.agents.update(&self.node, |s| {
            s.open = s.open.saturating_sub(1);
            s.connected = s.open > 0;
        });
    }
}

/// Who may open streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// Every stream is bound to its client certificate's node.
    Mtls,
    /// Plaintext (`--insecure`): the Hello's node is taken as said.
    Insecure,
}

/// The tonic service.
#[derive(Clone, Debug)]
pub struct StateService {
    states: watch::Receiver<Arc<Published>>,
    agents: Arc<Agents>,
    stop: Option<watch::Receiver<bool>>,
    security: Security,
    max_streams_per_node: u32,
    refusals: Arc<StreamRefusals>,
}

impl StateService {
    /// A service that requires mutual TLS (see [`Self::insecure`]).
    pub fn new(publisher: &Publisher, agents: Arc<Agents>) -> Self {
        StateService {
            states: publisher.subscribe(),
            agents,
            stop: None,
            security: Security::Mtls,
            max_streams_per_node: DEFAULT_MAX_STREAMS_PER_NODE,
            refusals: Arc::default(),
        }
    }

    /// Plaintext: trusts each Hello's node name (`--insecure`).
    pub fn insecure(mut self) -> Self {
        self.security = Security::Insecure;
        self
    }

    pub fn with_max_streams_per_node(mut self, n: u32) -> Self {
        self.max_streams_per_node = n.max(1);
        self
    }

    /// Counts refusals into `r` (shared with the metrics).
    pub fn with_refusals(mut self, r: Arc<StreamRefusals>) -> Self {
        self.refusals = r;
        self
    }

    fn refuse(&self, r: RefusalReason, peer: &str, status: Status) -> Status {
        self.refusals.count(r);
        warn!(
            peer,
            reason = r.label(),
            "stream refused: {}",
            status.message()
        );
        status
    }

    /// Ends every stream (cleanly, so agents reconnect) once `stop` turns true.
    pub fn with_shutdown(mut self, stop: watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The tower service for `tonic::transport::Server::add_service`.
    pub fn into_server(self) -> WatchServer {
        WatchServer {
            inner: Arc::new(self),
        }
    }
}

/// `rpclb.v1.StateStream`, served by hand rather than by the generated
/// server: tonic's encoder copies every message into a per-stream buffer
/// that keeps the capacity of the largest message it ever held (the
/// snapshot: ~170 B per service), for the stream's life. Here each stream's
/// response body is a queue of framed messages (`Bytes`), most of them
/// shared by every stream of the version ([`Published`]); the wire is the
/// same as the generated server's.
#[derive(Clone, Debug)]
pub struct WatchServer {
    inner: Arc<StateService>,
}

impl NamedService for WatchServer {
    const NAME: &'static str = pb::state_stream_server::SERVICE_NAME;
}

/// The path of the Watch method.
const WATCH_PATH: &str = "/rpclb.v1.StateStream/Watch";

impl<B> tonic::codegen::Service<http::Request<B>> for WatchServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            if req.uri().path() != WATCH_PATH {
                return Ok(Status::unimplemented("").into_http());
            }
            let decoder =
                ProstCodec::<pb::ControllerMessage, pb::AgentMessage>::default().decoder();
            let req =
                Request::from_http(req.map(|b| Streaming::new_request(decoder, b, None, None)));
            Ok(match inner.watch(req).await {
                Ok(rx) => {
                    let mut res =
                        http::Response::new(tonic::body::Body::new(FrameBody { rx, done: false }));
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        tonic::metadata::GRPC_CONTENT_TYPE,
                    );
                    res
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// A stream's outbound queue: framed messages, then an error or the end.
type Outbound = mpsc::Sender<Result<Bytes, Status>>;

/// The response body of one stream: its queued frames, then the trailers
/// (`grpc-status`).
struct FrameBody {
    rx: mpsc::Receiver<Result<Bytes, Status>>,
    done: bool,
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Ok(b)) => return Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
            Some(Err(s)) => s,
            None => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        Poll::Ready(Some(
            status
                .add_header(&mut trailers)
                .map(|()| http_body::Frame::trailers(trailers)),
        ))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl StateService {
    /// Checks the stream's Hello and identity, then starts serving it.
    async fn watch(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<mpsc::Receiver<Result<Bytes, Status>>, Status> {
        let info = req.extensions().get::<PeerInfo>().cloned();
        let peer = info
            .as_ref()
            .and_then(|i| i.remote)
            .or_else(|| req.remote_addr())
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        // The node this stream may speak for, and until when.
        let bound: Option<(String, SystemTime)> = match (self.security, info.and_then(|i| i.cert)) {
            (_, Some(cert)) => match cert.leaf.node() {
                Ok(n) => Some((n, cert.leaf.not_after)),
                Err(e) => {
                    return Err(self.refuse(
                        RefusalReason::NoIdentity,
                        &peer,
                        Status::permission_denied(format!("client certificate: {e}")),
                    ));
                }
            },
            (Security::Insecure, None) => None,
            (Security::Mtls, None) => {
                return Err(self.refuse(
                    RefusalReason::NoIdentity,
                    &peer,
                    Status::permission_denied("no client certificate"),
                ));
            }
        };
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                return Err(self.refuse(
                    RefusalReason::NoHello,
                    &peer,
                    Status::invalid_argument("the first message must be Hello"),
                ));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(self.refuse(
                    RefusalReason::NoHello,
                    &peer,
                    Status::deadline_exceeded("no Hello within 10 s"),
                ));
            }
        };
        if let Err(e) = lb_api::tls::validate_node_name(&hello.node) {
            return Err(self.refuse(
                RefusalReason::InvalidNodeName,
                &peer,
                Status::invalid_argument(format!("Hello.node: {e}")),
            ));
        }
        if let Some((cert_node, _)) = &bound
            && *cert_node != hello.node
        {
            return Err(self.refuse(
                RefusalReason::NodeMismatch,
                &peer,
                Status::permission_denied(format!(
                    "this client certificate is node {cert_node:?}'s; it cannot watch node {:?}",
                    hello.node
                )),
            ));
        }
        let node = hello.node.clone();
        let Some(open) = self.agents.open_stream(&node, self.max_streams_per_node) else {
            return Err(self.refuse(
                RefusalReason::TooManyStreams,
                &peer,
                Status::resource_exhausted(format!(
                    "node {node:?} has {} streams open already",
                    self.max_streams_per_node
                )),
            ));
        };
        info!(
            node,
            peer,
            authenticated = bound.is_some(),
            agent_version = hello.agent_version,
            applied_version = hello.applied_version,
            "agent connected"
        );
        // Frames are shared `Bytes`: a full queue costs a few pointers.
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve_stream(
            open,
            bound.map(|(_, not_after)| not_after),
            self.states.clone(),
            inbound,
            tx,
            self.agents.clone(),
            self.stop.clone(),
        ));
        Ok(rx)
    }
}

/// One agent's stream: snapshot, then deltas, reading acks, until either side
/// goes away or the client certificate expires.
async fn serve_stream(
    open: OpenStream,
    expires: Option<SystemTime>,
    mut states: watch::Receiver<Arc<Published>>,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: Outbound,
    agents: Arc<Agents>,
    stop: Option<watch::Receiver<bool>>,
) {
    let stopped = async move {
        match stop {
            Some(mut s) => {
                let _ = s.wait_for(|v| *v).await;
            }
            None => std::future::pending().await,
        }
    };
    let expired = async move {
        match expires {
            Some(t) => {
                let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            None => std::future::pending().await,
        }
    };
    let node = open.node.clone();
    let why = tokio::select! {
        why = follow(&node, &mut states, &mut inbound, &tx, &agents) => why,
        () = stopped => "the controller is shutting down".to_string(),
        () = expired => {
            let _ = tx.try_send(Err(Status::unauthenticated("the client certificate expired")));
            "its client certificate expired".to_string()
        }
    };
    drop(open);
    info!(node, "agent stream ended: {why}");
}

async fn follow(
    node: &str,
    states: &mut watch::Receiver<Arc<Published>>,
    inbound: &mut Streaming<pb::AgentMessage>,
    tx: &Outbound,
    agents: &Agents,
) -> String {
    // Nothing is sent before the first real version.
    let first = tokio::select! {
        r = states.wait_for(|p| p.version > 0) => match r {
            Ok(p) => p.clone(),
            Err(_) => return "the controller is shutting down".into(),
        },
        () = tx.closed() => return "the agent went away".into(),
    };
    // What this stream sent last: the published state itself, shared.
    let mut sent_version = first.version;
    let mut sent = first.for_node(node).clone();
    if tx.send(Ok(first.snapshot_of(&sent))).await.is_err() {
        return "the agent went away".into();
    }
    drop(first);
    agents.update(node, |s| s.sent = sent_version);
    debug!(node, version = sent_version, "sent snapshot");
    loop {
        tokio::select! {
            r = states.changed() => {
                if r.is_err() {
                    return "the controller is shutting down".into();
                }
                let p = states.borrow_and_update().clone();
                let next = p.for_node(node);
                if let Some(msg) = p.delta_to(sent_version, &sent, next) {
                    if tx.send(Ok(msg)).await.is_err() {
                        return "the agent went away".into();
                    }
                    debug!(node, base = sent_version, version = p.version, "sent delta");
                    sent_version = p.version;
                    sent = next.clone();
                    agents.update(node, |s| s.sent = sent_version);
                }
            }
            m = inbound.message() => match m {
                Ok(Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Ack(a)) })) => {
                    if a.error.is_empty() {
                        debug!(node, version = a.version, "acked");
                        let refused = wire::refusals_from_pb(&a.refused);
                        agents.update(node, |s| {
                            // Said once per change, not at every ack.
                            for r in refused.iter().filter(|r| !s.refused.contains(r)) {
                                warn!(node, version = a.version, "agent refused a service: {r}");
                            }
                            s.acked = a.version;
                            s.error = None;
                            s.refused = refused;
                        });
                    } else {
                        warn!(node, version = a.version, "agent could not apply: {}", a.error);
                        agents.update(node, |s| s.error = Some(a.error.clone()));
                    }
                }
                Ok(Some(_)) => warn!(node, "ignoring an unexpected message"),
                Ok(None) => return "the agent closed the stream".into(),
                Err(e) => return format!("stream error: {}", e.message()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_api::{Algorithm, Backend, DesiredState, Protocol, Service};
    use std::net::Ipv4Addr;

    fn state(services: u8, port: u16) -> NodeState {
        NodeState {
            state: DesiredState {
                services: (1..=services)
                    .map(|i| {
                        Service::new(
                            format!("ns/s{i}:p"),
                            Ipv4Addr::new(10, 96, 0, i),
                            80,
                            Protocol::Tcp,
                            Algorithm::Maglev,
                            vec![Backend::new(Ipv4Addr::new(10, 244, 0, i), port)],
                        )
                    })
                    .collect(),
            },
            timeouts: Default::default(),
        }
    }

    fn unframe(b: &Bytes) -> pb::ControllerMessage {
        assert_eq!(b[0], 0, "not compressed");
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len, b.len() - 5);
        pb::ControllerMessage::decode(&b[5..]).unwrap()
    }

    /// The fan-out's memory: every stream of the default state sends the same
    /// encoded bytes and keeps the published `Arc`, not a copy; an unchanged
    /// state keeps its `Arc` across versions.
    #[test]
    fn streams_share_published_states_and_their_encoded_messages() {
        let p = Publisher::with_epoch(0);
        let mut local = state(3, 8080);
        local.state.services[0].backends.clear();
        p.publish(
            state(3, 8080),
            BTreeMap::from([("node-l".to_string(), local.clone())]),
        );
        let v1 = p.current();
        let (a, b) = (
            v1.snapshot_of(v1.for_node("x")),
            v1.snapshot_of(v1.for_node("y")),
        );
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "one snapshot for every default node"
        );
        let m = unframe(&a);
        let got = wire::apply_message(&NodeState::default(), 0, &m).unwrap();
        assert_eq!(got.state, state(3, 8080));
        assert!(!Arc::ptr_eq(v1.for_node("node-l"), &v1.default));

        // One backend changes in the default state; node-l's state is unchanged.
        let mut next = state(3, 8080);
        next.state.services[1].backends[0].port = 9090;
        p.publish(
            next.clone(),
            BTreeMap::from([("node-l".to_string(), local)]),
        );
        let v2 = p.current();
        assert!(Arc::ptr_eq(v1.for_node("node-l"), v2.for_node("node-l")));
        let d1 = v2.delta_to(1, v1.for_node("x"), v2.for_node("x")).unwrap();
        let d2 = v2.delta_to(1, v1.for_node("y"), v2.for_node("y")).unwrap();
        assert_eq!(d1.as_ptr(), d2.as_ptr(), "one delta for every default node");
        let m = unframe(&d1);
        let Some(pb::controller_message::Body::Delta(d)) = &m.body else {
            panic!("not a delta: {m:?}");
        };
        assert_eq!((m.version, d.base_version, d.upserts.len()), (2, 1, 1));
        assert_eq!(
            wire::apply_message(&state(3, 8080), 1, &m).unwrap().state,
            next
        );
        assert!(
            v2.delta_to(1, v1.for_node("node-l"), v2.for_node("node-l"))
                .is_none(),
            "nothing for a node whose state did not change"
        );
        // A stream that missed a version gets its own delta, from its base.
        let mut third = next.clone();
        third.state.services[2].backends[0].port = 7070;
        p.publish(third.clone(), BTreeMap::new());
        let v3 = p.current();
        let own = unframe(&v3.delta_to(1, v1.for_node("x"), v3.for_node("x")).unwrap());
        assert_eq!(
            wire::apply_message(&state(3, 8080), 1, &own).unwrap().state,
            third
        );
        // node-l falls back to the default: a delta from its own state.
        let back = unframe(
            &v3.delta_to(2, v2.for_node("node-l"), v3.for_node("node-l"))
                .unwrap(),
        );
        assert_eq!(back.version, 3);
    }

    /// The hand-served Watch over a real connection: snapshot, shared deltas,
    /// per-node states, and a clean end of stream (grpc-status 0).
    #[tokio::test]
    async fn watch_serves_snapshots_and_deltas_to_tonic_clients() {
        let p = Arc::new(Publisher::with_epoch(0));
        let agents = Arc::new(Agents::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = StateService::new(&p, agents.clone())
            .insecure()
            .with_shutdown(stop_rx.clone())
            .into_server();
        let mut s2 = stop_rx.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = s2.wait_for(|s| *s).await;
                    },
                ),
        );
        let mut local = state(2, 8080);
        local.state.services[0].backends.clear();
        p.publish(
            state(2, 8080),
            BTreeMap::from([("node-l".to_string(), local.clone())]),
        );
        let mut clients = Vec::new();
        for node in ["node-a", "node-b", "node-l"] {
            let mut c = wire::StateStreamClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let (tx, rx) = mpsc::channel(4);
            tx.send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                    node: node.into(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let inbound = c
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            clients.push((node, tx, inbound, (0u64, NodeState::default())));
        }
        let mut want = state(2, 8080);
        for round in 0..3u16 {
            for (node, tx, inbound, have) in &mut clients {
                let m = inbound.message().await.unwrap().unwrap();
                let is_snapshot = matches!(m.body, Some(pb::controller_message::Body::Snapshot(_)));
                assert_eq!(is_snapshot, round == 0, "{node} round {round}");
                let next = wire::apply_message(&have.1, have.0, &m).unwrap();
                *have = (m.version, next.state);
                let expect = if *node == "node-l" { &local } else { &want };
                assert_eq!(&have.1, expect, "{node} round {round}");
                tx.send(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Ack(pb::Ack {
                        version: m.version,
                        ..Default::default()
                    })),
                })
                .await
                .unwrap();
            }
            // The next version: one backend of the default state, and node-l's too.
            want.state.services[1].backends[0].port = 9000 + round;
            local.state.services[1].backends[0].port = 9000 + round;
            p.publish(
                want.clone(),
                BTreeMap::from([("node-l".to_string(), local.clone())]),
            );
        }
        // Every ack arrived, and each stream holds the published state itself.
        for _ in 0..200 {
            if agents.snapshot().values().all(|a| a.acked == 3) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(agents.snapshot().values().all(|a| a.acked == 3));
        let _ = stop_tx.send(true);
        for (node, _, inbound, _) in &mut clients {
            // Version 4 may or may not have been sent before the stop; then a clean end.
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => panic!("{node}: the stream ended with {e}"),
                }
            }
        }
        drop(clients);
        server.await.unwrap().unwrap();
    }

    #[test]
    fn shared_node_states_stay_shared() {
        let p = Publisher::with_epoch(0);
        let svc = |port| {
            lb_api::Service::new(
                "a/b:c",
                std::net::Ipv4Addr::new(10, 96, 0, 1),
                port,
                lb_api::Protocol::Tcp,
                lb_api::Algorithm::Random,
                vec![],
            )
        };
        let st = |port| NodeState {
            state: lb_api::DesiredState {
                services: vec![svc(port)],
            },
            ..NodeState::default()
        };
        let zone = |port| Arc::new(st(port));
        let nodes = |z: &Arc<NodeState>, d: &Arc<NodeState>| {
            BTreeMap::from([
                ("a1".to_string(), z.clone()),
                ("a2".to_string(), z.clone()),
                ("a3".to_string(), z.clone()),
                ("b1".to_string(), d.clone()),
            ])
        };
        // b1's state equals the default: it gets the default's Arc.
        assert_eq!(p.publish_shared(st(1), nodes(&zone(2), &zone(1))), 1);
        let one = p.current();
        let a1 = one.for_node("a1");
        assert!(Arc::ptr_eq(a1, one.for_node("a2")) && Arc::ptr_eq(a1, one.for_node("a3")));
        assert!(Arc::ptr_eq(one.for_node("b1"), &one.default));
        assert_eq!(a1.state.services[0].port, 2);
        // Equal states again (new Arcs): nothing changes.
        assert_eq!(p.publish_shared(st(1), nodes(&zone(2), &zone(1))), 1);
        // The zone's state changes: one new Arc for its three nodes.
        assert_eq!(p.publish_shared(st(1), nodes(&zone(3), &zone(1))), 2);
        let two = p.current();
        let a1 = two.for_node("a1");
        assert_eq!(a1.state.services[0].port, 3);
        assert!(Arc::ptr_eq(a1, two.for_node("a2")) && Arc::ptr_eq(a1, two.for_node("a3")));
        assert!(
            Arc::ptr_eq(&two.default, &one.default),
            "the default is kept"
        );
    }

    #[test]
    fn publishing_an_unchanged_state_keeps_the_version() {
        let p = Publisher::with_epoch(0);
        let mut rx = p.subscribe();
        rx.mark_unchanged();
        assert_eq!(p.publish(NodeState::default(), BTreeMap::new()), 1);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert_eq!(p.publish(NodeState::default(), BTreeMap::new()), 1);
        assert!(
            !rx.has_changed().unwrap(),
            "no wake-up for an unchanged state"
        );
        let mut n = NodeState::default();
        n.timeouts.udp = Duration::from_secs(5);
        assert_eq!(p.publish(n.clone(), BTreeMap::new()), 2);
        let mut nodes = BTreeMap::new();
        nodes.insert("node-a".to_string(), NodeState::default());
        assert_eq!(p.publish(n.clone(), nodes), 3);
        let cur = p.current();
        assert_eq!(**cur.for_node("node-a"), NodeState::default());
        assert_eq!(**cur.for_node("node-b"), n);
    }
}
