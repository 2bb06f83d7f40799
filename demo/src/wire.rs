//! What the client pod reports to the orchestrator: one JSON object per line on its stdout.
//! The orchestrator answers on the client's stdin with `go` (run the second phase) or closes
//! it (abort).

use serde::{Deserialize, Serialize};

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
    Done,
    /// The client gave up.
    Fatal {
        error: String,
    },
}
