//! The backends: a tonic `grpc.testing.TestService` per pod, each on its own thread with a
//! small tokio runtime inside the pod's network namespace. Every response names the pod and
//! echoes the `x-test-header` metadata it received.

use crate::proto::test_service_server::{TestService, TestServiceServer};
use crate::proto::{
    Payload, SimpleRequest, SimpleResponse, StreamingOutputCallRequest, StreamingOutputCallResponse,
};
use anyhow::{Context, Result, anyhow};
use rpclb_tests::lab::Netns;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Largest payload a client may ask for, and most messages in one stream.
const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_MESSAGES: usize = 1000;
const MAX_INTERVAL: Duration = Duration::from_secs(1);

pub const TEST_HEADER: &str = "x-test-header";

#[derive(Debug, Clone)]
struct Pod {
    name: Arc<str>,
    served: Arc<AtomicU64>,
}

fn header(meta: &tonic::metadata::MetadataMap) -> String {
    meta.get(TEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn payload(size: i32) -> Result<Option<Payload>, Status> {
    let size = usize::try_from(size).map_err(|_| Status::invalid_argument("negative size"))?;
    if size > MAX_PAYLOAD {
        return Err(Status::invalid_argument(format!(
            "size {size} > {MAX_PAYLOAD}"
        )));
    }
    Ok(Some(Payload {
        body: vec![b'x'; size],
    }))
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<StreamingOutputCallResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TestService for Pod {
    async fn unary_call(
        &self,
        req: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        let test_header = header(req.metadata());
        let payload = payload(req.get_ref().response_size)?;
        self.served.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(SimpleResponse {
            payload,
            served_by: self.name.to_string(),
            test_header,
        }))
    }

    type StreamingOutputCallStream = ResponseStream;

    async fn streaming_output_call(
        &self,
        req: Request<StreamingOutputCallRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        let test_header = header(req.metadata());
        let params = req.into_inner().response_parameters;
        if params.len() > MAX_MESSAGES {
            return Err(Status::invalid_argument(format!(
                "{} messages > {MAX_MESSAGES}",
                params.len()
            )));
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let name = self.name.clone();
        tokio::spawn(async move { respond(&tx, &name, &test_header, params).await });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type FullDuplexCallStream = ResponseStream;

    async fn full_duplex_call(
        &self,
        req: Request<tonic::Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let test_header = header(req.metadata());
        let mut inbound = req.into_inner();
        self.served.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let name = self.name.clone();
        tokio::spawn(async move {
            // Bounded: at most MAX_MESSAGES requests per call.
            for _ in 0..MAX_MESSAGES {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if m.response_parameters.len() > MAX_MESSAGES {
                            let _ = tx
                                .send(Err(Status::invalid_argument("too many responses")))
                                .await;
                            return;
                        }
                        if !respond(&tx, &name, &test_header, m.response_parameters).await {
                            return;
                        }
                    }
                    // The client closed its side: end the call with OK.
                    Ok(None) => return,
                    Err(_) => return,
                }
            }
            let _ = tx
                .send(Err(Status::resource_exhausted("too many requests")))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Stream `params` as responses on `tx`; false when the client is gone or a size is bad.
async fn respond(
    tx: &tokio::sync::mpsc::Sender<Result<StreamingOutputCallResponse, Status>>,
    name: &str,
    test_header: &str,
    params: Vec<crate::proto::ResponseParameters>,
) -> bool {
    for p in params {
        let wait = Duration::from_micros(p.interval_us.max(0) as u64).min(MAX_INTERVAL);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let msg = payload(p.size).map(|payload| StreamingOutputCallResponse {
            payload,
            served_by: name.to_string(),
            test_header: test_header.to_string(),
            server_time_us: now_us(),
        });
        let bad = msg.is_err();
        if tx.send(msg).await.is_err() || bad {
            return false;
        }
    }
    true
}

/// One pod's server. Dropping it shuts the server down (in-flight calls get a moment to
/// finish) and joins its thread.
pub struct PodServer {
    pub name: String,
    served: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    /// Bind `addr` inside `ns` and serve there until dropped.
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<Self> {
        let served = Arc::new(AtomicU64::new(0));
        let pod = Pod {
            name: name.into(),
            served: served.clone(),
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let thread = ns
            .spawn(&format!("pod-{name}"), move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                rt.block_on(async move {
                    // Bind here, inside the namespace, and report the outcome before serving.
                    let listener = match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(e) => return drop(ready_tx.send(Err(e))),
                    };
                    let _ = ready_tx.send(Ok(()));
                    // TCP_NODELAY: without it, small responses wait for the delayed ACK
                    // (40 ms per call here).
                    let incoming = tonic::transport::server::TcpIncoming::from(listener)
                        .with_nodelay(Some(true));
                    // After the stop signal, open connections get a short grace period.
                    let stopping = Arc::new(tokio::sync::Notify::new());
                    let shutdown = {
                        let stopping = stopping.clone();
                        async move {
                            let _ = stop_rx.await;
                            stopping.notify_one();
                        }
                    };
                    let serve = tonic::transport::Server::builder()
                        .timeout(Duration::from_secs(10))
                        .add_service(TestServiceServer::new(pod))
                        .serve_with_incoming_shutdown(incoming, shutdown);
                    tokio::select! {
                        r = serve => if let Err(e) = r {
                            eprintln!("pod server: {e}");
                        },
                        () = async {
                            stopping.notified().await;
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        } => {}
                    }
                });
            })
            .with_context(|| format!("start pod {name}"))?;
        let mut server = PodServer {
            name: name.to_string(),
            served,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => {
                server.stop.take();
                Err(anyhow!("pod {name}: bind {addr} in {}: {e}", ns.name()))
            }
            Err(_) => Err(anyhow!("pod {name}: server did not start")),
        }
    }

    /// Calls this pod has answered (unary + streaming), as the server counts them.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// All pods of the demo. Dropping it signals every server first and then joins them, so their
/// grace periods overlap.
#[derive(Default)]
pub struct Pods(pub Vec<PodServer>);

impl Drop for Pods {
    fn drop(&mut self) {
        for s in &mut self.0 {
            if let Some(tx) = s.stop.take() {
                let _ = tx.send(());
            }
        }
        self.0.clear(); // each PodServer's Drop joins its thread
    }
}
