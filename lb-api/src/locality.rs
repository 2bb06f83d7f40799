//! The locality policy ([`Locality`]), resolved for one node: which backends
//! keep taking new flows there.
//!
//! One function ([`keep`]) for every producer: the controller resolves each
//! node's state with it (Kubernetes mode: the Nodes' `topology.kubernetes.io/`
//! labels; standalone: the file's `nodes:`), and an agent with `--config`
//! resolves its own ([`resolve`]). The result is plain weights: the backends
//! outside the chosen tier get weight 0 (drained: their established flows go
//! on), so the data path does no work per packet for it.
//!
//! Rules, for a node at `here` (its name, zone and region):
//!
//! - The tiers are tried in order. A tier that `here` cannot name (a zone
//!   tier on a node without a zone) is skipped.
//! - A tier's backends are those whose node (zone, region) equals `here`'s.
//!   A backend whose place is not known is in no tier but "anywhere".
//! - The first tier with at least `min_backends` backends that take new
//!   flows ([`Backend::takes_new_flows`]: weight > 0 and active) wins: only
//!   its backends keep their weights.
//! - When no tier has enough, every backend keeps its weight ("anywhere").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Backend, DesiredState, Locality, LocalityTier, Service};

/// Where a node is: its `topology.kubernetes.io/zone` and `region` labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeLocation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Nodes by name, with their locations.
pub type NodeLocations = BTreeMap<String, NodeLocation>;

/// A place: a node, a zone, a region, each possibly unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Place<'a> {
    pub node: Option<&'a str>,
    pub zone: Option<&'a str>,
    pub region: Option<&'a str>,
}

impl<'a> Place<'a> {
    /// The place of `node`, as `nodes` says.
    pub fn of_node(node: Option<&'a str>, nodes: &'a NodeLocations) -> Self {
        let loc = node.and_then(|n| nodes.get(n));
        Place {
            node,
            zone: loc.and_then(|l| l.zone.as_deref()),
            region: loc.and_then(|l| l.region.as_deref()),
        }
    }

    fn at(&self, tier: LocalityTier) -> Option<&'a str> {
        match tier {
            LocalityTier::Node => self.node,
            LocalityTier::Zone => self.zone,
            LocalityTier::Region => self.region,
        }
    }
}

/// Which of `backends` keep taking new flows at `here` under `locality`;
/// `place_of(i)` is where backend `i` runs. `None`: all of them (no tier
/// had enough).
pub fn keep<'a>(
    backends: &[Backend],
    locality: &Locality,
    here: &Place<'_>,
    place_of: impl Fn(usize) -> Place<'a>,
) -> Option<Vec<bool>> {
    for &tier in &locality.tiers {
        let Some(mine) = here.at(tier) else { continue };
        let inside: Vec<bool> = (0..backends.len())
            .map(|i| place_of(i).at(tier) == Some(mine))
            .collect();
        let live = backends
            .iter()
            .zip(&inside)
            .filter(|(b, k)| **k && b.takes_new_flows())
            .count();
        if live >= locality.min_backends as usize {
            return Some(inside);
        }
    }
    None
}

/// Drains (weight 0) the backends of `service` that `keep` leaves out.
/// With `spill` (the policy's `spill_outstanding` in the gRPC mode), each
/// one drained here keeps its weight as `spill_weight`: the gRPC balancer
/// spills over to it when the kept ones are busy.
pub fn drain_others(service: &mut Service, keep: &[bool], spill: bool) {
    for (b, k) in service.backends.iter_mut().zip(keep) {
        if !k {
            if spill && b.weight > 0 {
                b.spill_weight = Some(b.weight);
            }
            b.weight = 0;
        }
    }
}

/// Resolves `service`'s locality policy (if any) at `here`, with
/// `place_of(i)` the place of backend `i`: the backends outside the chosen
/// tier are drained ([`drain_others`]) and the policy is taken out, unless
/// it has a gRPC-mode `spill_outstanding`, which the agent's balancer
/// reads (docs/policies.md, "Locality").
pub fn apply<'a>(service: &mut Service, here: &Place<'_>, place_of: impl Fn(usize) -> Place<'a>) {
    let Some(locality) = service.locality.take() else {
        return;
    };
    let spill = locality.spill_outstanding.is_some() && service.grpc.is_some();
    if let Some(k) = keep(&service.backends, &locality, here, place_of) {
        drain_others(service, &k, spill);
    }
    if spill {
        service.locality = Some(locality);
    }
}

/// `state` as the node `node` balances it: each service's locality policy
/// resolved with the backends' nodes' places from `nodes` ([`apply`]). A
/// state without locality policies is returned as it is.
pub fn resolve(state: &DesiredState, node: Option<&str>, nodes: &NodeLocations) -> DesiredState {
    let here = Place::of_node(node, nodes);
    let services = state
        .services
        .iter()
        .map(|s| {
            if s.locality.is_none() {
                return s.clone();
            }
            let places: Vec<Place> = s
                .backends
                .iter()
                .map(|b| Place::of_node(b.node.as_deref(), nodes))
                .collect();
            let mut out = s.clone();
            apply(&mut out, &here, |i| places[i]);
            out
        })
        .collect();
    DesiredState { services }
}

/// Whether any service of `state` has a locality policy.
pub fn any(state: &DesiredState) -> bool {
    state.services.iter().any(|s| s.locality.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, BackendState, Protocol};
    use std::net::Ipv4Addr;

    fn nodes() -> NodeLocations {
        let loc = |z: &str, r: &str| NodeLocation {
            zone: Some(z.into()),
            region: Some(r.into()),
        };
        [
            ("a1".to_string(), loc("za", "r1")),
            ("a2".to_string(), loc("za", "r1")),
            ("b1".to_string(), loc("zb", "r1")),
            ("c1".to_string(), loc("zc", "r2")),
        ]
        .into_iter()
        .collect()
    }

    fn svc(locality: Option<Locality>, on: &[&str]) -> Service {
        let backends = on
            .iter()
            .enumerate()
            .map(|(i, n)| Backend {
                node: Some(n.to_string()),
                ..Backend::new(Ipv4Addr::new(10, 244, 0, i as u8 + 1), 80)
            })
            .collect();
        Service {
            locality,
            ..Service::new(
                "s",
                Ipv4Addr::new(10, 96, 0, 1),
                80,
                Protocol::Tcp,
                Algorithm::Random,
                backends,
            )
        }
    }

    fn weights(st: &DesiredState) -> Vec<u32> {
        st.services[0].backends.iter().map(|b| b.weight).collect()
    }

    fn policy(tiers: &[LocalityTier], min: u32) -> Option<Locality> {
        Some(Locality {
            tiers: tiers.to_vec(),
            min_backends: min,
            spill_outstanding: None,
        })
    }

    #[test]
    fn tiers_and_spill_over() {
        use LocalityTier::*;
        let n = nodes();
        let on = ["a1", "a2", "b1", "c1"];
        let st = |p, node: &str| {
            let s = DesiredState {
                services: vec![svc(p, &on)],
            };
            let r = resolve(&s, Some(node), &n);
            assert_eq!(r.services[0].locality, None, "resolved");
            weights(&r)
        };
        // Node, then zone, then region, then anywhere.
        let p = || policy(&[Node, Zone, Region], 1);
        assert_eq!(st(p(), "a1"), [1, 0, 0, 0]);
        assert_eq!(st(policy(&[Zone], 1), "a1"), [1, 1, 0, 0]);
        assert_eq!(st(policy(&[Region], 1), "c1"), [0, 0, 0, 1]);
        // min 2: a1 alone is too few, its zone has 2.
        assert_eq!(st(policy(&[Node, Zone, Region], 2), "a1"), [1, 1, 0, 0]);
        // min 3: zone za has 2, region r1 has 3.
        assert_eq!(st(policy(&[Node, Zone, Region], 3), "a1"), [1, 1, 1, 0]);
        // min 4: nothing has enough: all.
        assert_eq!(st(policy(&[Node, Zone, Region], 4), "a1"), [1, 1, 1, 1]);
        // A node not listed: no zone or region, node tier empty: all.
        assert_eq!(st(p(), "x9"), [1, 1, 1, 1]);
        // No policy: untouched.
        assert_eq!(st(None, "a1"), [1, 1, 1, 1]);
    }

    #[test]
    fn only_backends_taking_new_flows_count() {
        use LocalityTier::*;
        let n = nodes();
        let mut s = svc(policy(&[Zone], 2), &["a1", "a2", "b1", "c1"]);
        s.backends[1].state = BackendState::Terminating;
        let st = DesiredState { services: vec![s] };
        // za has one live backend, below 2: anywhere.
        assert_eq!(weights(&resolve(&st, Some("a2"), &n)), [1, 1, 1, 1]);
        let mut s = st.services[0].clone();
        s.backends[1].state = BackendState::Active;
        s.backends[0].weight = 0;
        let st = DesiredState { services: vec![s] };
        // A drained one does not count either (and stays drained).
        assert_eq!(weights(&resolve(&st, Some("a2"), &n)), [0, 1, 1, 1]);
        let mut s = st.services[0].clone();
        s.backends[0].weight = 3;
        let st = DesiredState { services: vec![s] };
        // Weights of the kept tier are kept.
        assert_eq!(weights(&resolve(&st, Some("a2"), &n)), [3, 1, 0, 0]);
    }

    #[test]
    fn spill_weights_are_kept_for_the_grpc_mode_only() {
        use LocalityTier::*;
        let n = nodes();
        let spill = Locality {
            spill_outstanding: Some(4),
            ..policy(&[Zone], 1).unwrap()
        };
        let mut s = svc(Some(spill.clone()), &["a1", "a2", "b1", "c1"]);
        s.grpc = Some(crate::model::GrpcPolicy::default());
        s.backends[2].weight = 5;
        s.backends[3].weight = 0;
        let st = DesiredState {
            services: vec![s.clone()],
        };
        let r = resolve(&st, Some("a1"), &n);
        let spills: Vec<Option<u32>> = r.services[0]
            .backends
            .iter()
            .map(|b| b.spill_weight)
            .collect();
        assert_eq!(weights(&r), [1, 1, 0, 0]);
        // b1 drained here keeps its weight 5; c1 was drained already.
        assert_eq!(spills, [None, None, Some(5), None]);
        // The policy stays for the agent's balancer.
        assert_eq!(r.services[0].locality, Some(spill.clone()));
        // Anywhere (no tier has enough): nothing drained, nothing to spill to.
        let r = resolve(&st, Some("x9"), &n);
        assert_eq!(weights(&r), [1, 1, 5, 0]);
        assert!(
            r.services[0]
                .backends
                .iter()
                .all(|b| b.spill_weight.is_none())
        );
        // Without spill_outstanding, or in the L4 mode: no spill weights,
        // and the policy is taken out.
        for mut s in [
            svc(policy(&[Zone], 1), &["a1", "a2", "b1", "c1"]),
            s.clone(),
        ] {
            if s.locality
                .as_ref()
                .is_some_and(|l| l.spill_outstanding.is_some())
            {
                s.grpc = None;
            } else {
                s.grpc = Some(crate::model::GrpcPolicy::default());
            }
            let r = resolve(&DesiredState { services: vec![s] }, Some("a1"), &n);
            assert_eq!(weights(&r)[..2], [1, 1]);
            assert_eq!(r.services[0].locality, None);
            assert!(
                r.services[0]
                    .backends
                    .iter()
                    .all(|b| b.spill_weight.is_none())
            );
        }
    }
}
