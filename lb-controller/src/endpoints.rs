//! Where the controller reads a Service's endpoints: EndpointSlices
//! (discovery.k8s.io/v1, the default) or core v1 Endpoints, which every
//! Kubernetes version serves.
//!
//! `--endpoints-source auto` (the default) asks the API server at start
//! ([`choose`]) and takes EndpointSlices when discovery.k8s.io/v1 serves
//! them, else Endpoints; the choice is logged. A source that is asked for
//! by name but not served is an error at start, never a controller that
//! waits for a list that cannot come.
//!
//! # Endpoints, and what they lose
//! An Endpoints object is turned into the EndpointSlices that describe the
//! same backends ([`slices_from_endpoints`]), so one translation
//! ([`crate::translate`]) serves both sources:
//!
//! - each subset becomes one slice, with the subset's ports (names,
//!   numbers and protocols, as the Endpoints controller resolved them from
//!   the Service's named or numbered `targetPort`s) and its
//!   `addresses` as ready endpoints, with their `nodeName` and `targetRef` (IPv6
//!   addresses in a second slice of `addressType: IPv6`);
//! - `notReadyAddresses` are left out.
//!
//! What is lost: Endpoints have no `terminating` or `serving` condition. A
//! pod that starts terminating simply leaves `addresses`, so its backend is
//! removed, not marked terminating: new flows stop at once (as they
//! would), established L4 flows keep their backend in conntrack, but the
//! gRPC mode cannot drain it (its pooled connections close instead of
//! finishing their calls), and lbctl and the metrics never show it as
//! terminating. Endpoints also carry no zone hints, and one object holds at
//! most 1000 addresses (the API server truncates larger ones).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::translate::SERVICE_NAME_LABEL;

/// Which kind the controller reads endpoints from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointsSource {
    /// discovery.k8s.io/v1 EndpointSlices.
    EndpointSlices,
    /// core v1 Endpoints.
    Endpoints,
}

impl fmt::Display for EndpointsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndpointsSource::EndpointSlices => "endpointslices",
            EndpointsSource::Endpoints => "endpoints",
        })
    }
}

/// `--endpoints-source`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceChoice {
    /// EndpointSlices where served, else Endpoints.
    #[default]
    Auto,
    EndpointSlices,
    Endpoints,
}

impl std::str::FromStr for SourceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SourceChoice::Auto),
            "endpointslices" => Ok(SourceChoice::EndpointSlices),
            "endpoints" => Ok(SourceChoice::Endpoints),
            _ => Err(format!(
                "unknown endpoints source {s:?} (expected auto, endpointslices or endpoints)"
            )),
        }
    }
}

/// What the API server serves, as far as the choice goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// `v1.20.2`, say.
    pub version: String,
    /// discovery.k8s.io/v1 has `endpointslices`.
    pub endpointslices_v1: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "--endpoints-source endpointslices: this API server ({version}) does not serve \
         discovery.k8s.io/v1 EndpointSlices (Kubernetes 1.21 and newer do); use \
         --endpoints-source endpoints or auto"
    )]
    NotServed { version: String },
    #[error("asking the API server what it serves: {0}")]
    Discovery(String),
}

/// The source for `choice`, given what the server serves.
pub fn decide(choice: SourceChoice, served: &Served) -> Result<EndpointsSource, SourceError> {
    match (choice, served.endpointslices_v1) {
        (SourceChoice::Endpoints, _) => Ok(EndpointsSource::Endpoints),
        (SourceChoice::EndpointSlices | SourceChoice::Auto, true) => {
            Ok(EndpointsSource::EndpointSlices)
        }
        (SourceChoice::Auto, false) => Ok(EndpointsSource::Endpoints),
        (SourceChoice::EndpointSlices, false) => Err(SourceError::NotServed {
            version: served.version.clone(),
        }),
    }
}

/// Asks the API server for its version and whether discovery.k8s.io/v1
/// serves EndpointSlices.
#[cfg(feature = "kube")]
pub async fn discover(client: &kube::Client) -> Result<Served, SourceError> {
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| SourceError::Discovery(e.to_string()))?
        .git_version;
    let endpointslices_v1 = match client.list_api_group_resources("discovery.k8s.io/v1").await {
        Ok(list) => list.resources.iter().any(|r| r.name == "endpointslices"),
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => return Err(SourceError::Discovery(e.to_string())),
    };
    Ok(Served {
        version,
        endpointslices_v1,
    })
}

/// The EndpointSlices that describe the same backends as `ep` (see the
/// [module docs](self)); named `<name>-endpoints-<subset>`.
pub fn slices_from_endpoints(ep: &Endpoints) -> Vec<EndpointSlice> {
    let Some(name) = ep.metadata.name.as_deref() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, subset) in ep.subsets.iter().flatten().enumerate() {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: Some(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        // One slice per address family, as the EndpointSlice controller
        // writes them (an IPv6 slice only when the subset has IPv6 addresses).
        for (v6, suffix) in [(false, ""), (true, "-v6")] {
            let endpoints: Vec<Endpoint> = subset
                .addresses
                .iter()
                .flatten()
                .filter(|a| {
                    a.ip.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_ipv6() == v6)
                })
                .map(|a| Endpoint {
                    addresses: vec![a.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: a.node_name.clone(),
                    // The Pod, for its own annotations (rpclb.io/weight, /max).
                    target_ref: a.target_ref.clone(),
                    ..Endpoint::default()
                })
                .collect();
            if v6 && endpoints.is_empty() {
                continue;
            }
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-endpoints-{i}{suffix}")),
                    namespace: ep.metadata.namespace.clone(),
                    labels: Some(BTreeMap::from([(
                        SERVICE_NAME_LABEL.to_string(),
                        name.to_string(),
                    )])),
                    ..ObjectMeta::default()
                },
                address_type: if v6 { "IPv6" } else { "IPv4" }.into(),
                endpoints: Some(endpoints),
                ports: Some(ports.clone()),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::node_state;
    use k8s_openapi::api::core::v1::{
        EndpointAddress, EndpointSubset, Service as KubeService, ServicePort, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use lb_api::{Backend, BackendState};

    fn addr(ip: &str, node: Option<&str>) -> EndpointAddress {
        EndpointAddress {
            ip: ip.into(),
            node_name: node.map(Into::into),
            ..EndpointAddress::default()
        }
    }

    fn port(
        name: Option<&str>,
        port: i32,
        protocol: &str,
    ) -> k8s_openapi::api::core::v1::EndpointPort {
        k8s_openapi::api::core::v1::EndpointPort {
            name: name.map(Into::into),
            port,
            protocol: Some(protocol.into()),
            app_protocol: None,
        }
    }

    fn endpoints(subsets: Vec<EndpointSubset>) -> Endpoints {
        Endpoints {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            subsets: Some(subsets),
        }
    }

    fn service() -> KubeService {
        KubeService {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.20".into()),
                ports: Some(vec![
                    ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: Some(IntOrString::String("web".into())),
                        ..ServicePort::default()
                    },
                    ServicePort {
                        name: Some("dns".into()),
                        port: 53,
                        protocol: Some("UDP".into()),
                        ..ServicePort::default()
                    },
                ]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    /// Two subsets (pods with different target port numbers, as a named
    /// targetPort gives), not-ready addresses left out, IPv6 in a slice of
    /// its own.
    #[test]
    fn endpoints_translate_like_their_slices() {
        let ep = endpoints(vec![
            EndpointSubset {
                addresses: Some(vec![
                    addr("10.244.1.2", Some("node-a")),
                    addr("fd00::2", Some("node-a")),
                ]),
                not_ready_addresses: Some(vec![addr("10.244.1.9", Some("node-a"))]),
                ports: Some(vec![
                    port(Some("http"), 8080, "TCP"),
                    port(Some("dns"), 5353, "UDP"),
                ]),
            },
            EndpointSubset {
                addresses: Some(vec![addr("10.244.2.2", None)]),
                not_ready_addresses: None,
                ports: Some(vec![port(Some("http"), 9090, "TCP")]),
            },
        ]);
        let slices = slices_from_endpoints(&ep);
        assert_eq!(slices.len(), 3);
        assert_eq!(slices[0].metadata.name.as_deref(), Some("web-endpoints-0"));
        assert_eq!(
            slices[1].metadata.name.as_deref(),
            Some("web-endpoints-0-v6")
        );
        assert_eq!(slices[1].address_type, "IPv6");
        assert_eq!(
            slices[1].endpoints.as_ref().unwrap()[0].addresses,
            ["fd00::2"]
        );
        assert_eq!(slices[2].address_type, "IPv4");
        assert_eq!(
            slices[0].metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "web"
        );
        let t = node_state(&[service()], &slices, "node-a");
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let by_name: BTreeMap<&str, &lb_api::Service> = t
            .state
            .services
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let active = |ip: &str, port| Backend {
            state: BackendState::Active,
            ..Backend::new(ip.parse::<std::net::IpAddr>().unwrap(), port)
        };
        assert_eq!(
            by_name["shop/web:http"].backends,
            [
                Backend {
                    node: Some("node-a".into()),
                    ..active("10.244.1.2", 8080)
                },
                active("10.244.2.2", 9090)
            ]
        );
        assert_eq!(
            by_name["shop/web:dns"].backends,
            [Backend {
                node: Some("node-a".into()),
                ..active("10.244.1.2", 5353)
            }]
        );
    }

    #[test]
    fn empty_and_unnamed_endpoints_give_nothing() {
        assert!(slices_from_endpoints(&endpoints(vec![])).is_empty());
        assert!(slices_from_endpoints(&Endpoints::default()).is_empty());
        let t = node_state(
            &[service()],
            &slices_from_endpoints(&endpoints(vec![])),
            "n",
        );
        assert!(t.state.services.iter().all(|s| s.backends.is_empty()));
    }

    #[test]
    fn the_source_is_decided_by_what_is_served() {
        let old = Served {
            version: "v1.20.2".into(),
            endpointslices_v1: false,
        };
        let new = Served {
            version: "v1.33.0".into(),
            endpointslices_v1: true,
        };
        use EndpointsSource as E;
        use SourceChoice as C;
        assert_eq!(decide(C::Auto, &old).unwrap(), E::Endpoints);
        assert_eq!(decide(C::Auto, &new).unwrap(), E::EndpointSlices);
        assert_eq!(decide(C::Endpoints, &new).unwrap(), E::Endpoints);
        assert_eq!(decide(C::EndpointSlices, &new).unwrap(), E::EndpointSlices);
        let e = decide(C::EndpointSlices, &old).unwrap_err().to_string();
        assert!(
            e.contains("v1.20.2") && e.contains("--endpoints-source endpoints"),
            "{e}"
        );
        assert_eq!("auto".parse::<SourceChoice>(), Ok(C::Auto));
        assert!("slices".parse::<SourceChoice>().is_err());
    }
}
