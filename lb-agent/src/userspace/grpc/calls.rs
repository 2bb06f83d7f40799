//! What each call and each attempt ended with: the per-call metrics (status
//! code and latency, per service and per backend) and the outcomes outlier
//! detection counts.
//!
//! - A call (service level) ends with the status the client got: the
//!   backend's (trailers, or a trailers-only answer), the proxy's own
//!   (UNAVAILABLE, DEADLINE_EXCEEDED), or CANCELLED when the client went
//!   away first. Its latency runs from the request to the end of the
//!   response.
//! - An attempt (backend level) is one sending of the call to a backend:
//!   it ends with the backend's status, UNAVAILABLE when its stream was
//!   reset or refused or its connection broke, or CANCELLED when the proxy
//!   cut it (deadline, client gone). Its latency runs from the sending to
//!   its end. An attempt whose request never left the proxy is not one.

use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;

use super::outlier::{Outcome, Outliers};
use super::retry::trailers_only_status;
use crate::userspace::select::{BackendEntry, ServiceShared};

const CANCELLED: u32 = 1;
const UNKNOWN: u32 = 2;
const DEADLINE_EXCEEDED: u32 = 4;
const UNAVAILABLE: u32 = 14;

/// A call on its service, counted once when it ends (CANCELLED if dropped
/// before).
#[derive(Debug)]
pub(crate) struct CallRecord {
    svc: Arc<ServiceShared>,
    started: Instant,
    done: bool,
}

impl CallRecord {
    pub(crate) fn new(svc: Arc<ServiceShared>) -> Self {
        CallRecord {
            svc,
            started: Instant::now(),
            done: false,
        }
    }

    /// The client got `code`.
    pub(crate) fn finish(&mut self, code: u32) {
        if !std::mem::replace(&mut self.done, true) {
            self.svc.counters.calls.record(code, self.started.elapsed());
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

/// One attempt of a call on a backend, counted once when it ends
/// (CANCELLED if dropped before: the proxy cut it).
#[derive(Debug)]
pub(crate) struct Attempt {
    svc: Arc<ServiceShared>,
    outliers: Arc<Outliers>,
    backend: Arc<BackendEntry>,
    started: Instant,
    done: bool,
}

impl Attempt {
    /// The call is being sent to `backend` now.
    pub(crate) fn new(
        svc: Arc<ServiceShared>,
        outliers: Arc<Outliers>,
        backend: Arc<BackendEntry>,
    ) -> Self {
        Attempt {
            svc,
            outliers,
            backend,
            started: Instant::now(),
            done: false,
        }
    }

    fn end(&mut self, code: u32, outcome: Option<Outcome>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.backend
            .counters
            .calls
            .record(code, self.started.elapsed());
        if let Some(o) = outcome {
            self.outliers.record(&self.svc, &self.backend, o);
        }
    }

    /// The backend answered with `code`.
    pub(crate) fn answered(&mut self, code: u32) {
        self.end(code, Some(Outcome::of_status(code)));
    }

    /// Its stream failed (UNAVAILABLE); `failure`: a failure for outlier
    /// detection (not a graceful GOAWAY's unprocessed stream).
    pub(crate) fn failed(&mut self, failure: bool) {
        self.end(UNAVAILABLE, failure.then_some(Outcome::Failure));
    }

    /// The request never left the proxy: not an attempt.
    pub(crate) fn unsent(&mut self) {
        self.done = true;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.end(CANCELLED, None);
    }
}

/// A call whose response comes from a backend: ends both records.
#[derive(Debug)]
pub(crate) struct CallEnd {
    call: CallRecord,
    attempt: Attempt,
    /// The status of a trailers-only answer.
    header_status: Option<u32>,
}

impl CallEnd {
    pub(crate) fn new(call: CallRecord, attempt: Attempt, response: &HeaderMap) -> Self {
        CallEnd {
            call,
            attempt,
            header_status: trailers_only_status(response),
        }
    }

    /// The response ended, with these trailers if any: their status, else
    /// the headers' (trailers-only), else UNKNOWN (no status at all).
    pub(crate) fn ended(&mut self, trailers: Option<&HeaderMap>) {
        let code = trailers
            .and_then(trailers_only_status)
            .or(self.header_status)
            .unwrap_or(UNKNOWN);
        self.attempt.answered(code);
        self.call.finish(code);
    }

    /// The backend's stream failed while streaming: the client gets
    /// UNAVAILABLE.
    pub(crate) fn stream_failed(&mut self) {
        self.attempt.failed(true);
        self.call.finish(UNAVAILABLE);
    }

    /// The proxy's deadline passed while streaming.
    pub(crate) fn deadline(&mut self) {
        self.attempt.end(CANCELLED, None);
        self.call.finish(DEADLINE_EXCEEDED);
    }
}
