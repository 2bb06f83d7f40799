//! The backends: `rpclb_tests::grpc`'s `grpc.testing.TestService` per pod
//! (the gRPC lab tests' too), each on its own thread inside the pod's
//! network namespace. Every response names the pod and echoes the
//! `x-test-header` metadata it received.

use anyhow::{Context, Result};
use rpclb_tests::grpc::{GrpcServer, Journal, ServerOptions, TestBackend};
use rpclb_tests::lab::Netns;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use rpclb_tests::grpc::TEST_HEADER;

/// How long a stopping pod lets in-flight calls finish.
const GRACE: Duration = Duration::from_secs(2);

/// One pod's server. Dropping it shuts the server down (in-flight calls get
/// a moment to finish) and joins its thread.
pub struct PodServer {
    pub name: String,
    index: usize,
    journal: Arc<Journal>,
    server: GrpcServer,
}

/// All pods of the demo. Dropping it signals every server first and then
/// joins them, so their grace periods overlap.
pub struct Pods {
    pub pods: Vec<PodServer>,
    /// Counts for every pod (no per-call log: a demo run may be long).
    journal: Arc<Journal>,
}

impl Pods {
    pub fn new() -> Self {
        Pods {
            pods: Vec::new(),
            journal: Arc::new(Journal::counting()),
        }
    }

    /// Binds `addr` inside `ns` and serves pod `name` there until dropped. With
    /// `max_connection_age`, every connection gets a graceful GOAWAY at that age (as a gRPC
    /// server's MAX_CONNECTION_AGE) and its calls in flight get `GRACE` to finish.
    pub fn start(
        &mut self,
        ns: &Netns,
        name: &str,
        addr: SocketAddr,
        max_connection_age: Option<Duration>,
    ) -> Result<()> {
        let index = self.pods.len();
        let backend = TestBackend::new(index, name, self.journal.clone());
        let opts = ServerOptions {
            grace: GRACE,
            max_connection_age,
            age_grace: GRACE,
            ..ServerOptions::default()
        };
        let server = GrpcServer::start_with(ns, addr, backend, opts)
            .with_context(|| format!("start pod {name}"))?;
        self.pods.push(PodServer {
            name: name.to_string(),
            index,
            journal: self.journal.clone(),
            server,
        });
        Ok(())
    }
}

impl PodServer {
    /// Calls this pod has answered (unary + streaming), as the server counts them.
    pub fn served(&self) -> u64 {
        self.journal.served(self.index)
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for p in &mut self.pods {
            p.server.signal_stop();
        }
        self.pods.clear(); // each GrpcServer's Drop joins its thread
    }
}
