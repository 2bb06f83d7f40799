//! The agent's conntrack GC beside the lab's data path: a thread that runs, every `interval`,
//! `lb-agent`'s GC tick (`lb_agent::gc::tick`, what the agent's `gc_loop` runs: a recount
//! baseline, the scan-plan-delete of `gc::expire_recount`, the credit, and the IPv6 sweep), on its own
//! `MapWriter` over the lab's pinned maps. The bench loads the data path in-process and has no
//! agent; this puts the agent's CPU (and its deletes) into the measured runs, on a thread
//! named [`THREAD`] whose schedstat `cpu.rs` reads.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lb_agent::datapath::MapWriter;
use lb_agent::gc;
use lb_api::config::Timeouts;

/// Name (`comm`) of the GC thread.
pub const THREAD: &str = "rpclb-gc";

/// What the sweeps did, summed.
#[derive(Clone, Copy, Debug, Default)]
pub struct GcTotals {
    pub sweeps: u64,
    pub scanned: u64,
    pub expired: u64,
    pub evicted: u64,
    pub max_sweep: Duration,
    pub errors: u64,
    /// The thread's CPU time (schedstat), ns.
    pub cpu_ns: u64,
}

/// The running GC thread; stopped and joined by [`AgentGc::stop`] or on drop.
pub struct AgentGc {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<GcTotals>>,
}

/// The GC period of the lab: `RPCLB_BENCH_AGENT_GC` (e.g. `1s`, `500ms`; `off` for none),
/// else the agent's default (`--gc-interval 5s`).
pub fn interval_from_env() -> Result<Option<Duration>> {
    match std::env::var("RPCLB_BENCH_AGENT_GC") {
        Err(_) => Ok(Some(Duration::from_secs(5))),
        Ok(v) if v == "off" || v == "0" => Ok(None),
        Ok(v) => lb_agent::duration::parse(&v)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("RPCLB_BENCH_AGENT_GC={v}: {e}")),
    }
}

impl AgentGc {
    pub fn start(pin: &Path, every: Duration) -> Result<AgentGc> {
        let w = std::sync::Mutex::new(
            MapWriter::open_pinned(pin)
                .with_context(|| format!("GC: opening the maps at {}", pin.display()))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(THREAD.into())
            .spawn(move || {
                let t = Timeouts::default();
                let mut tot = GcTotals::default();
                let mut next = Instant::now() + every;
                while !s.load(Ordering::Relaxed) {
                    if Instant::now() < next {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    next += every;
                    match gc::tick(&w, &t) {
                        Ok(gc::Tick { report: r, .. }) => {
                            tot.sweeps += 1;
                            tot.scanned += r.scanned;
                            tot.expired += r.expired;
                            tot.evicted += r.evicted;
                            tot.max_sweep = tot.max_sweep.max(r.duration);
                        }
                        Err(_) => tot.errors += 1,
                    }
                }
                tot.cpu_ns = super::throughput::thread_sched(|c| c == THREAD).cpu_ns;
                tot
            })
            .context("spawn the GC thread")?;
        Ok(AgentGc {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) -> GcTotals {
        self.halt()
    }

    fn halt(&mut self) -> GcTotals {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for AgentGc {
    fn drop(&mut self) {
        self.halt();
    }
}
