//! What the client pod reports to the orchestrator: one JSON object per line on its stdout.
//! The orchestrator answers on the client's stdin with `go` (run the second phase) or closes
//! it (abort).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Before the live event.
    Before,
    /// After the live event.
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Unary,
    Stream,
}

/// One finished call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    /// Service key (`b`, `c`).
    pub svc: String,
    pub phase: Phase,
    pub kind: Kind,
    /// The pod that answered; empty when the call failed before any answer.
    pub pod: String,
    pub ok: bool,
    /// Every response carried back the `x-test-header` value this call sent.
    pub echoed: bool,
    /// Connect + call (+ whole stream), microseconds.
    pub us: u64,
    pub error: Option<String>,
}

/// A long-lived call (FullDuplexCall, one ping-pong every interval) that spans the live event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inflight {
    pub pod: String,
    /// Responses received.
    pub messages: u32,
    /// Responses received after the orchestrator's `go` (sent once the event was applied).
    pub after_event: u32,
    pub ok: bool,
    pub echoed: bool,
    /// Server clock of the last message, microseconds since the Unix epoch.
    pub last_server_us: i64,
    pub error: Option<String>,
}

/// The third phase, per target: many unary calls over ONE channel (one TCP connection,
/// HTTP/2 multiplexing the calls), a few in flight at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OneChannel {
    /// Target key (`b`, `b-grpc`).
    pub svc: String,
    /// HOST:PORT as called.
    pub name: String,
    /// Calls the client was to make.
    pub planned: usize,
    /// Successful calls per pod that answered.
    pub per_pod: BTreeMap<String, usize>,
    pub ok: usize,
    pub failed: usize,
    /// Successful calls that got their own `x-test-header` value back.
    pub echoed: usize,
    /// TCP connections the channel opened (counted by its connector): 1 when every call
    /// shared the one connection.
    pub connections: usize,
    /// Per call (the channel is already open), microseconds; 0 when no call succeeded.
    pub p50_us: u64,
    pub p99_us: u64,
    /// The first failure (or why the channel could not be opened).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A service name resolved inside the client pod.
    Resolved {
        svc: String,
        name: String,
        addr: String,
    },
    Call(Call),
    /// A phase finished.
    PhaseDone {
        phase: Phase,
    },
    /// The in-flight streams are open; the pods they landed on.
    InflightOpen {
        pods: Vec<String>,
    },
    /// Waiting for `go` on stdin.
    Waiting,
    InflightDone(Inflight),
    /// The third phase: the one channel to a target is connected (`addr`: its peer).
    OneChannelOpen {
        svc: String,
        name: String,
        addr: String,
    },
    /// The third phase: every call over the one channel to a target is done.
    OneChannel(OneChannel),
    Done,
    /// The client gave up.
    Fatal {
        error: String,
    },
}
