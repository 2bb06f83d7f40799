//! Which data path serves which service.
//!
//! - **eBPF** (the kernel programs): every service with `grpc: None`
//!   (connection balancing), IPv4 and IPv6 (lb-ebpf/src/v6.rs). Services
//!   with `grpc: Some` (per-call gRPC balancing) are left out of the
//!   kernel's maps, so their VIP packets pass to the stack, where the
//!   agent's userspace proxy listens on the VIP.
//! - **userspace** (`--datapath userspace`, or `auto` when eBPF cannot be
//!   loaded or attached): the userspace proxy serves every service.
//!
//! In both, the external front ends (node ports, external IPs; `crate::external`)
//! are services of their own, served where their service is.
//!
//! Both get the desired state with the backends that fail their health
//! checks drained (weight 0; `crate::health`).
//!
//! The userspace proxy starts with the first state that needs it, with that
//! state's timeouts; a later change of timeouts reaches the proxy at the next
//! agent start. Unlike the kernel path, the proxy's connections end with the
//! agent, unless it hands them to the next one (`--handover-socket`,
//! `userspace::handover`).

use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, anyhow};
use lb_api::{DesiredState, Refusal, ServiceAddr};
use tracing::info;

use crate::config::Timeouts;
use crate::datapath::Datapath;
use crate::health::HealthChecker;
use crate::metrics::{DatapathSnapshot, StatsSource};
use crate::userspace::handover::{Handed, Inherited};
use crate::userspace::{GrpcOptions, ProxyError, ProxyOptions, UserspaceProxy};

pub type SharedDp = Arc<Mutex<Datapath>>;

/// The services' selectors after the last apply (`/status`, the metrics).
pub type SharedSelectors = Arc<Mutex<Vec<crate::datapath::selector::SelectorStatus>>>;

/// What the userspace data path says of a selector: it never runs one.
pub const SELECTOR_IN_USERSPACE: &str =
    "not used: the userspace data path uses the built-in algorithm";

pub fn lock(dp: &Mutex<Datapath>) -> MutexGuard<'_, Datapath> {
    // A panic while holding the lock leaves the maps as consistent as the
    // kernel sees them at any time; keep going.
    dp.lock().unwrap_or_else(|e| e.into_inner())
}

/// The data paths of a running agent.
pub struct Engines {
    /// `None` in userspace mode.
    pub kernel: Option<SharedDp>,
    /// Started with the first state that needs it; the metrics read it too.
    proxy: SharedProxy,
    /// What the previous agent handed over, for the proxy's start.
    inherited: Mutex<Option<Inherited>>,
    /// `ProxyOptions::worker_threads` of the proxy (`--userspace-threads`).
    pub proxy_threads: usize,
    /// The gRPC mode's settings of the proxy (`--grpc-*`).
    pub grpc: GrpcOptions,
    /// Active health checks: what is applied is the state with unhealthy
    /// backends drained ([`HealthChecker::effective`]).
    pub health: HealthChecker,
    /// This node's name and addresses, for the external front ends.
    pub node: crate::external::NodeInfo,
    /// The health-check node ports (`healthCheckNodePort`).
    pub health_node_ports: crate::external::HealthNodePorts,
    /// The services' selectors after the last apply.
    pub selectors: SharedSelectors,
}

type SharedProxy = Arc<Mutex<Option<Arc<UserspaceProxy>>>>;

fn current(proxy: &SharedProxy) -> Option<Arc<UserspaceProxy>> {
    proxy.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Engines {
    pub fn new(kernel: Option<SharedDp>) -> Self {
        Engines {
            kernel,
            proxy: Arc::new(Mutex::new(None)),
            inherited: Mutex::new(None),
            proxy_threads: 0,
            grpc: GrpcOptions::default(),
            health: HealthChecker::new(),
            node: Default::default(),
            health_node_ports: Default::default(),
            selectors: Default::default(),
        }
    }

    /// The previous agent's sockets: the proxy starts on them.
    pub fn set_inherited(&self, i: Inherited) {
        *self.inherited.lock().unwrap_or_else(|e| e.into_inner()) = Some(i);
    }

    /// Parks the proxy and returns its sockets and routes for a successor
    /// (nothing without a proxy). Blocking.
    pub fn hand_over(&self, wait: std::time::Duration) -> (Vec<Handed>, Vec<std::net::IpAddr>) {
        match current(&self.proxy) {
            Some(p) => p.hand_over(wait),
            None => (Vec::new(), Vec::new()),
        }
    }

    pub fn mode(&self) -> &'static str {
        if self.kernel.is_some() {
            "ebpf"
        } else {
            "userspace"
        }
    }

    /// Reads the userspace proxy's own stats (`/grpc`).
    pub fn proxy_stats(&self) -> ProxyStats {
        ProxyStats(self.proxy.clone())
    }

    /// Reads kernel and proxy counters for the metrics.
    pub fn stats_source(&self) -> Box<dyn StatsSource> {
        Box::new(Combined {
            kernel: self.kernel.clone(),
            proxy: self.proxy.clone(),
        })
    }

    /// Applies a state: the kernel's part, then the proxy's (each diff-only).
    /// A service that a data path cannot take is refused alone (its previous
    /// version stays) and returned; an error means the apply could not run.
    pub async fn apply(
        &self,
        state: &DesiredState,
        timeouts: &Timeouts,
    ) -> anyhow::Result<Vec<Refusal>> {
        // Check what the state holds; apply it with the unhealthy drained.
        self.health.set_targets(state);
        let state = &self.health.effective(state);
        self.health_node_ports.update(state, &self.node);
        let mut snat = crate::external::SnatSet::new();
        let (kernel_part, proxy_part) = match &self.kernel {
            Some(_) => {
                // The external front ends are services of their own (crate::external).
                let (all, s) = crate::external::expand_snat(state, &self.node);
                snat = s;
                let in_proxy = |s: &lb_api::Service| s.grpc.is_some();
                let l4: Vec<_> = all.services.into_iter().filter(|s| !in_proxy(s)).collect();
                // The proxy's front ends as without kernel SNAT (this node's
                // backends first).
                let plain = crate::external::NodeInfo {
                    snat: false,
                    snat6: false,
                    ..self.node.clone()
                };
                let l7: Vec<_> = crate::external::expand(state, &plain)
                    .services
                    .into_iter()
                    .filter(in_proxy)
                    .collect();
                (
                    Some(DesiredState { services: l4 }),
                    DesiredState { services: l7 },
                )
            }
            None => (None, crate::external::expand(state, &self.node)),
        };
        let mut refused = Vec::new();
        if let (Some(dp), Some(part)) = (&self.kernel, kernel_part) {
            let dp = dp.clone();
            let (r, sel) = tokio::task::spawn_blocking(move || {
                let mut dp = lock(&dp);
                let w = dp.writer();
                w.set_snat(snat);
                let r = w.apply(&part);
                (r, w.selector_status())
            })
            .await
            .context("apply task")?;
            *self.selectors.lock().unwrap_or_else(|e| e.into_inner()) = sel;
            refused = r.map_err(|e| anyhow!(e))?;
        } else {
            let sel = state
                .services
                .iter()
                .filter_map(|s| {
                    Some(crate::datapath::selector::SelectorStatus {
                        service: s.name.clone(),
                        selector: s.selector.clone()?,
                        state: SELECTOR_IN_USERSPACE.into(),
                    })
                })
                .collect();
            *self.selectors.lock().unwrap_or_else(|e| e.into_inner()) = sel;
        }
        let proxy = match current(&self.proxy) {
            Some(p) => p,
            None if proxy_part.services.is_empty() => return Ok(refused),
            None => {
                let opts = ProxyOptions {
                    worker_threads: self.proxy_threads,
                    ..ProxyOptions::with_timeouts(timeouts)
                }
                .with_grpc(&self.grpc);
                let inherited = self
                    .inherited
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                // `start` blocks briefly (netlink, its own runtime).
                let p = tokio::task::spawn_blocking(move || {
                    UserspaceProxy::start_with(opts, inherited)
                })
                .await
                .context("starting the userspace proxy")?
                .map_err(|e| anyhow!(e).context("starting the userspace proxy"))?;
                let p = Arc::new(p);
                *self.proxy.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
                info!(
                    services = proxy_part.services.len(),
                    "userspace proxy started"
                );
                p
            }
        };
        match proxy.apply_async(&proxy_part).await {
            Ok(_) => {}
            Err(ProxyError::Several(errors)) => {
                refused.extend(errors.into_iter().map(|e| proxy_refusal(&proxy_part, e)))
            }
            Err(e) => return Err(anyhow!(e).context("userspace proxy")),
        }
        let left = proxy.drop_inherited();
        if left > 0 {
            info!(
                sockets = left,
                "closed the handed-over sockets of services that are gone"
            );
        }
        Ok(refused)
    }

    /// Stops the userspace proxy (its connections end, its VIP routes go).
    /// Call from a blocking context: the proxy owns a runtime.
    pub fn shutdown_proxy(&self) -> anyhow::Result<()> {
        let p = self.proxy.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = p {
            match Arc::try_unwrap(p) {
                Ok(p) => p.shutdown().map_err(|e| anyhow!(e))?,
                Err(p) => drop(p),
            }
        }
        Ok(())
    }
}

/// A service the userspace proxy could not take, as a refusal.
fn proxy_refusal(state: &DesiredState, e: ProxyError) -> Refusal {
    let name_of = |a: &ServiceAddr| {
        state
            .services
            .iter()
            .find(|s| s.addr() == *a)
            .map_or_else(|| a.to_string(), |s| s.name.clone())
    };
    match e {
        ProxyError::InvalidService { name, addr, reason } => Refusal {
            service: name,
            addr: Some(addr),
            reason,
        },
        ProxyError::Listen { name, addr, source } => Refusal {
            service: name,
            addr: Some(addr),
            reason: format!("listening on {addr}: {source}"),
        },
        ProxyError::DuplicateService(addr) => Refusal {
            service: name_of(&addr),
            addr: Some(addr),
            reason: "another service has the same address".into(),
        },
        e => Refusal {
            service: "<userspace proxy>".into(),
            addr: None,
            reason: e.to_string(),
        },
    }
}

/// The userspace proxy's stats, if it runs; cheap to clone.
#[derive(Clone)]
pub struct ProxyStats(SharedProxy);

impl ProxyStats {
    /// Every service the proxy serves (none before it starts).
    pub fn stats(&self) -> Vec<crate::userspace::ServiceStats> {
        current(&self.0).map(|p| p.stats()).unwrap_or_default()
    }
}

/// Kernel and proxy counters as one snapshot (reason counters summed by name).
struct Combined {
    kernel: Option<SharedDp>,
    proxy: SharedProxy,
}

impl StatsSource for Combined {
    fn snapshot(&self) -> Result<DatapathSnapshot, String> {
        let mut snap = match &self.kernel {
            Some(dp) => DatapathSnapshot::read(lock(dp).writer())
                .map_err(|e| crate::agent::render_error(&e.into()))?,
            None => DatapathSnapshot::default(),
        };
        if let Some(proxy) = current(&self.proxy) {
            let p = crate::userspace::datapath_snapshot(&proxy.stats());
            snap.services.extend(p.services);
            for (name, n) in p.reasons {
                match snap.reasons.iter_mut().find(|(r, _)| *r == name) {
                    Some((_, m)) => *m += n,
                    None => snap.reasons.push((name, n)),
                }
            }
        }
        Ok(snap)
    }
}
