//! Section `stream`: endpoints change -> node maps updated, through the controller's gRPC
//! stream.
//!
//! In one process, inside a namespace of its own (the gRPC connection runs on that
//! namespace's loopback): the controller's `Publisher` + `StateService` (tonic), the agent's
//! `stream::follow` client, and an applier thread that owns a loaded data path (scratch pins,
//! not attached) and writes each update with `MapWriter::apply`, as the agent's run loop does.
//! The state has `services` services of 10 backends. Each change replaces one backend of one
//! service (a pod replaced), is published, and is timed until the agent's ack of that version
//! reaches the controller; the agent acks only after the maps are written. That covers the
//! controller's diff, the gRPC hop, the agent's checks, the map writes and the ack; it leaves
//! out the Kubernetes watch delay (API server -> controller). At the end the pinned maps are
//! read back and must hold the last change.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use lb_agent::datapath::scratch::ScratchDatapath;
use lb_agent::datapath::writer::MapWriter;
use lb_agent::stream::{self, StreamOptions, StreamStatus, Update};
use lb_api::wire::NodeState;
use lb_api::{Algorithm, Backend, DesiredState, Protocol, Service};
use lb_controller::grpc::{Agents, Publisher};
use tokio::sync::mpsc;

use super::{LocalWatch, Opts, Table, check_stop, count, header, median, percentile, verdict};
use rpclb_tests::lab::Netns;

const NODE: &str = "bench-node";
const PER_SERVICE: u32 = 10;

fn backend_ip(svc: u32, i: u32, generation: u32) -> Ipv4Addr {
    // 10.244.<svc hi>.<svc lo> is not enough room; spread over 10.244.0.0/16 by index.
    let n = (svc * PER_SERVICE + i) * 4 + (generation % 4);
    Ipv4Addr::new(10, 244, (n >> 8) as u8, (n & 0xff) as u8)
}

fn initial(services: u32) -> NodeState {
    let services = (0..services)
        .map(|s| {
            Service::new(
                format!("bench/svc-{s}:grpc"),
                Ipv4Addr::new(10, 96, (s >> 8) as u8, (s & 0xff) as u8),
                50051,
                Protocol::Tcp,
                Algorithm::Maglev,
                (0..PER_SERVICE)
                    .map(|i| Backend::new(backend_ip(s, i, 0), 8080))
                    .collect(),
            )
        })
        .collect();
    NodeState {
        state: DesiredState { services },
        timeouts: Default::default(),
    }
}

pub fn section_stream(opts: &Opts) -> Result<()> {
    header("5. Endpoints change -> node maps (controller stream)");
    let services: u32 = if opts.quick { 200 } else { 1_000 };
    let changes: usize = if opts.quick { 50 } else { 300 };
    let mut dp = ScratchDatapath::new(|c| {
        c.max_services = 4_096;
        c.max_backends = 16_384;
        c.max_slots = 1 << 24;
    })
    .map_err(|e| anyhow!("loading the data path: {e}"))?;
    let ns = Netns::new("bench-stream")?;
    let (apply_ms, lat_ms, last, dp) = ns.run(move || -> Result<_> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (up_tx, mut up_rx) = mpsc::channel::<Update>(1);
        // The applier: the agent's run loop, reduced to what an update costs.
        let applier = std::thread::spawn(move || {
            let mut apply_ms = Vec::new();
            while let Some(u) = up_rx.blocking_recv() {
                let t = Instant::now();
                let r = dp.writer().apply(&u.state.state).map_err(|e| e.to_string());
                apply_ms.push(t.elapsed().as_secs_f64() * 1e3);
                let _ = u.done.send(r);
            }
            (apply_ms, dp)
        });
        let res = rt.block_on(drive(services, changes, up_tx));
        drop(rt);
        let (apply_ms, dp) = applier
            .join()
            .map_err(|_| anyhow!("applier thread panicked"))?;
        let (lat, last) = res?;
        Ok((apply_ms, lat, last, dp))
    })??;

    // The pinned maps (read back through a second handle, as lbctl does) hold the last change.
    let w = MapWriter::open_pinned(dp.dir()).map_err(|e| anyhow!("open pinned maps: {e}"))?;
    let (addr, want) = last;
    let got: Vec<std::net::IpAddr> = w
        .backend_stats(&addr)
        .map_err(|e| anyhow!("reading backends of {addr}: {e}"))?
        .iter()
        .map(|b| b.ip)
        .collect();
    ensure!(
        got.contains(&want.into()),
        "the maps lack the last change: {addr} has {got:?}, wanted {want}"
    );

    let p50 = median(&lat_ms);
    let p99 = percentile(&lat_ms, 99.0);
    let mut t = Table::new(&["what", "p50 ms", "p99 ms", "max ms"]);
    t.row(vec![
        format!(
            "publish -> agent ack, {} changes, {} services x {PER_SERVICE} backends",
            count(lat_ms.len() as u64),
            count(u64::from(services))
        ),
        format!("{p50:.2}"),
        format!("{p99:.2}"),
        format!("{:.2}", super::max(&lat_ms)),
    ]);
    let changes_apply = &apply_ms[1.min(apply_ms.len())..];
    t.row(vec![
        "  of which MapWriter::apply (agent side)".to_string(),
        format!("{:.2}", median(changes_apply)),
        format!("{:.2}", percentile(changes_apply, 99.0)),
        format!("{:.2}", super::max(changes_apply)),
    ]);
    t.row(vec![
        format!(
            "  first snapshot: {} services applied",
            count(u64::from(services))
        ),
        format!("{:.2}", apply_ms.first().copied().unwrap_or(0.0)),
        String::new(),
        String::new(),
    ]);
    print!("{}", t.render());
    verdict(
        "Endpoints change -> node maps updated",
        "p99 < 100 ms",
        format!("p99 {p99:.2} ms (p50 {p50:.2} ms; excludes the Kubernetes watch delay)"),
        Some(p99 < 100.0),
    );
    Ok(())
}

type Last = (lb_api::ServiceAddr, Ipv4Addr);

async fn drive(
    services: u32,
    changes: usize,
    up_tx: mpsc::Sender<Update>,
) -> Result<(Vec<f64>, Last)> {
    let publisher = Publisher::new();
    let agents = Arc::new(Agents::default());
    // Plaintext: this measures the controller's diff, the hop and the writes, not TLS.
    let server = LocalWatch::start(&publisher, agents.clone()).await?;
    let status = Arc::new(StreamStatus::default());
    let client = tokio::spawn(stream::follow(
        StreamOptions::new(format!("http://{}", server.addr), NODE),
        up_tx,
        status,
        server.stop.subscribe(),
    ));

    let mut state = initial(services);
    let v = publisher.publish(state.clone(), BTreeMap::new());
    wait_ack(&agents, v, Duration::from_secs(60)).await?;
    let mut lat = Vec::with_capacity(changes);
    let mut last = None;
    for k in 0..changes {
        check_stop()?;
        let s = (k as u32 * 7919) % services;
        let i = k as u32 % PER_SERVICE;
        let generation = 1 + k as u32 / PER_SERVICE;
        let ip = backend_ip(s, i, generation);
        let svc = &mut state.state.services[s as usize];
        svc.backends[i as usize].ip = ip.into();
        last = Some((svc.addr(), ip));
        let t = Instant::now();
        let v = publisher.publish(state.clone(), BTreeMap::new());
        wait_ack(&agents, v, Duration::from_secs(5)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = server.stop.send(true);
    let _ = client.await;
    let _ = server.task.await;
    Ok((lat, last.context("no changes made")?))
}

/// Waits until the node's agent acked version `v` without an error.
async fn wait_ack(agents: &Agents, v: u64, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if let Some(a) = agents.snapshot().get(NODE) {
            if let Some(e) = &a.error {
                return Err(anyhow!("the agent could not apply version {v}: {e}"));
            }
            if a.acked >= v {
                return Ok(t0.elapsed());
            }
        }
        if t0.elapsed() > limit {
            return Err(anyhow!("no ack of version {v} within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}
