//! The proxy's counters in the shape the metrics already export for the
//! kernel path, so `/metrics` shows the same series in either mode.

use std::collections::BTreeMap;

use super::{ServiceStats, StatsHandle};
use crate::datapath;
use crate::metrics::{DatapathSnapshot, GrpcTlsCounts, ServiceSnapshot, StatsSource};

/// Maps the proxy's stats onto the kernel path's snapshot: packets and bytes
/// are both directions summed, `new_flows` is new connections, `drops` all
/// reasons; backend ids are positions (1-based) since there are no map ids.
/// `reasons` holds the drop reasons summed over services.
///
/// For a gRPC (L7) service the balanced unit is the call, so `new_flows` is
/// calls (`requests`) and a backend's `active` is its outstanding calls: the
/// same series then show how calls spread over the backends.
pub fn datapath_snapshot(stats: &[ServiceStats]) -> DatapathSnapshot {
    let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
    let services = stats
        .iter()
        .map(|s| {
            for (r, n) in &s.drops {
                *reasons.entry(r.as_str()).or_default() += n;
            }
            ServiceSnapshot {
                name: s.name.clone(),
                grpc_calls: s.grpc.then_some(s.calls),
                grpc_tls: (s.grpc && s.tls).then_some(GrpcTlsCounts {
                    handshakes: s.tls_handshakes,
                    handshake_failures: s.tls_handshake_failures,
                    reloads: s.tls_reloads,
                    reload_errors: s.tls_reload_errors,
                }),
                stats: datapath::ServiceStats {
                    packets: s.packets_in + s.packets_out,
                    bytes: s.bytes_in + s.bytes_out,
                    new_flows: if s.grpc {
                        s.requests
                    } else {
                        s.new_connections
                    },
                    drops: s.total_drops(),
                },
                backends: s
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| datapath::BackendStats {
                        id: i as u32 + 1,
                        ip: b.ip,
                        port: b.port,
                        weight: b.weight,
                        state: b.status.as_str(),
                        packets: b.packets_in + b.packets_out,
                        bytes: b.bytes_in + b.bytes_out,
                        new_flows: if s.grpc {
                            b.requests
                        } else {
                            b.new_connections
                        },
                        active: if s.grpc {
                            b.active_requests
                        } else {
                            b.active_connections
                        },
                        limit: b.limit,
                        grpc: s.grpc.then_some(datapath::GrpcBackendCounts {
                            connections_opened: b.new_connections,
                            goaways: b.goaways,
                            transparent_retries: b.transparent_retries,
                            retries: b.retries,
                            retries_throttled: b.retries_throttled,
                            calls: b.calls,
                            ejected: b.ejected_for_ms > 0,
                            ejections: b.ejections,
                        }),
                    })
                    .collect(),
            }
        })
        .collect();
    DatapathSnapshot {
        services,
        reasons: reasons.into_iter().collect(),
    }
}

impl StatsSource for StatsHandle {
    fn snapshot(&self) -> Result<DatapathSnapshot, String> {
        Ok(datapath_snapshot(&self.stats()))
    }
}
