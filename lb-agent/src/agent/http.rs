//! The agent's HTTP endpoints: `/metrics` (Prometheus text), `/healthz`
//! (the run loop is alive), `/readyz` (attached and the first state
//! applied; the body says what runs where) and `/status` (JSON: the data
//! path, its interfaces, readiness, the controller stream and the services'
//! selectors; `lbctl status` and `lbctl selector list` read it) and `/grpc`
//! (JSON: the gRPC mode per service and backend, `crate::grpc_view`; `lbctl
//! grpc` reads it).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

use super::{STALL, Shared};

pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/grpc", get(grpc))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

async fn index() -> &'static str {
    "rpclb lb-agent: /metrics /healthz /readyz /status /grpc\n"
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    {
        let st = &s.stream;
        let m = &s.metrics;
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.controller_connected
            .set(st.connected.load(Ordering::Relaxed).into());
        m.controller_version
            .set(g(st.version.load(Ordering::Relaxed)));
        m.controller_reconnects
            .set(g(st.reconnects.load(Ordering::Relaxed)));
        m.controller_cert_rotations
            .set(g(st.cert_rotations.load(Ordering::Relaxed)));
        m.controller_cert_expiry
            .set(g(st.cert_not_after.load(Ordering::Relaxed)));
    }
    match tokio::task::spawn_blocking(move || s.metrics.render()).await {
        Ok(Ok(body)) => {
            ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding: {e}\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn healthz(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    let idle = s.since_beat();
    if idle < STALL {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("run loop stalled for {idle:?}\n"),
        )
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    let detail = s.datapath.describe();
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, format!("ready\n{detail}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{detail}"),
        )
    }
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    let st = &s.stream;
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": s.ready.load(Ordering::Relaxed),
        "datapath": &s.datapath,
        "controller": {
            "connected": st.connected.load(Ordering::Relaxed),
            "version": st.version.load(Ordering::Relaxed),
            "reconnects": st.reconnects.load(Ordering::Relaxed),
        },
        "conntrack": *s.conntrack.lock().unwrap_or_else(|e| e.into_inner()),
        "health": crate::health::Health::of(&s.health.snapshot()),
        "selectors": s.selectors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body:#}\n"),
    )
        .into_response()
}

async fn grpc(State(s): State<Arc<Shared>>) -> Response {
    let view = crate::grpc_view::build(&s.proxy.stats(), &s.health.snapshot());
    match serde_json::to_string_pretty(&view) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body + "\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
