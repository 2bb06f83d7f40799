//! What changes between two desired states, for logs and for operators.
//!
//! The map writes themselves are `MapWriter::apply`'s job: it reconciles the
//! whole state, writes only what differs (an unchanged service costs no map
//! write) and never touches conntrack. This module only describes the change
//! (`services +1 -0 ~1 (backends +1 -1 ~0)`), so that a reload says in one log
//! line what it did, and an unchanged file says so.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use lb_api::{Backend, DesiredState, Service, ServiceAddr};

/// How one service present in both states changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceChange {
    pub name: String,
    /// `ip:port` of backends that are new.
    pub backends_added: Vec<String>,
    /// `ip:port` of backends that are gone.
    pub backends_removed: Vec<String>,
    /// `ip:port` of backends whose weight or state changed.
    pub backends_changed: Vec<String>,
    /// Name, algorithm, affinity or Maglev size changed.
    pub settings_changed: bool,
}

/// The difference between two desired states, by service address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Names of services that are new.
    pub added: Vec<String>,
    /// Names of services that are gone.
    pub removed: Vec<String>,
    /// Services in both states that differ.
    pub changed: Vec<ServiceChange>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    fn backend_totals(&self) -> (usize, usize, usize) {
        self.changed.iter().fold((0, 0, 0), |(a, r, c), s| {
            (
                a + s.backends_added.len(),
                r + s.backends_removed.len(),
                c + s.backends_changed.len(),
            )
        })
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let (ba, br, bc) = self.backend_totals();
        write!(
            f,
            "services +{} -{} ~{} (backends +{ba} -{br} ~{bc})",
            self.added.len(),
            self.removed.len(),
            self.changed.len()
        )?;
        let mut details = Vec::new();
        details.extend(self.added.iter().map(|n| format!("+{n}")));
        details.extend(self.removed.iter().map(|n| format!("-{n}")));
        details.extend(self.changed.iter().map(|c| format!("~{}", c.name)));
        const SHOWN: usize = 8;
        if !details.is_empty() {
            let more = details.len().saturating_sub(SHOWN);
            details.truncate(SHOWN);
            write!(f, ": {}", details.join(", "))?;
            if more > 0 {
                write!(f, ", and {more} more")?;
            }
        }
        Ok(())
    }
}

fn by_addr(s: &DesiredState) -> BTreeMap<ServiceAddr, &Service> {
    s.services.iter().map(|svc| (svc.addr(), svc)).collect()
}

fn backends(s: &Service) -> BTreeMap<(IpAddr, u16), &Backend> {
    s.backends.iter().map(|b| ((b.ip, b.port), b)).collect()
}

fn endpoint(k: &(IpAddr, u16)) -> String {
    std::net::SocketAddr::new(k.0, k.1).to_string()
}

/// What turns `old` into `new`.
pub fn diff(old: &DesiredState, new: &DesiredState) -> Diff {
    let (old, new) = (by_addr(old), by_addr(new));
    let mut d = Diff::default();
    for (addr, n) in &new {
        let Some(o) = old.get(addr) else {
            d.added.push(n.name.clone());
            continue;
        };
        let (ob, nb) = (backends(o), backends(n));
        let c = ServiceChange {
            name: n.name.clone(),
            backends_added: nb
                .keys()
                .filter(|k| !ob.contains_key(k))
                .map(endpoint)
                .collect(),
            backends_removed: ob
                .keys()
                .filter(|k| !nb.contains_key(k))
                .map(endpoint)
                .collect(),
            backends_changed: nb
                .iter()
                .filter(|(k, b)| ob.get(k).is_some_and(|o| o != *b))
                .map(|(k, _)| endpoint(k))
                .collect(),
            settings_changed: o.name != n.name
                || o.algorithm != n.algorithm
                || o.affinity_timeout != n.affinity_timeout
                || o.maglev_table_size != n.maglev_table_size,
        };
        if c != (ServiceChange {
            name: c.name.clone(),
            ..Default::default()
        }) {
            d.changed.push(c);
        }
    }
    d.removed = old
        .iter()
        .filter(|(a, _)| !new.contains_key(a))
        .map(|(_, s)| s.name.clone())
        .collect();
    d
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use lb_api::{Algorithm, BackendState, Protocol};

    fn svc(name: &str, port: u16, backends: &[(u8, u32)]) -> Service {
        Service {
            max_per_backend: None,
            selector: None,
            external: Default::default(),
            name: name.into(),
            vip: Ipv4Addr::new(10, 96, 0, 1).into(),
            port,
            protocol: Protocol::Tcp,
            algorithm: Algorithm::Maglev,
            affinity_timeout: None,
            maglev_table_size: None,
            locality: None,
            grpc: None,
            health_check: None,
            backends: backends
                .iter()
                .map(|&(last, weight)| Backend {
                    weight,
                    ..Backend::new(Ipv4Addr::new(10, 244, 0, last), 8080)
                })
                .collect(),
        }
    }

    fn state(s: Vec<Service>) -> DesiredState {
        DesiredState { services: s }
    }

    #[test]
    fn identical_states_have_no_diff() {
        let a = state(vec![svc("a/b:c", 80, &[(1, 1), (2, 1)])]);
        let d = diff(&a, &a.clone());
        assert!(d.is_empty());
        assert_eq!(d.to_string(), "no change");
    }

    #[test]
    fn backend_order_does_not_matter() {
        let a = state(vec![svc("a/b:c", 80, &[(1, 1), (2, 1)])]);
        let b = state(vec![svc("a/b:c", 80, &[(2, 1), (1, 1)])]);
        assert!(diff(&a, &b).is_empty());
    }

    #[test]
    fn services_and_backends_added_removed_changed() {
        let old = state(vec![
            svc("ns/a:http", 80, &[(1, 1), (2, 1)]),
            svc("ns/gone:http", 81, &[(3, 1)]),
        ]);
        let mut a2 = svc("ns/a:http", 80, &[(2, 5), (4, 1)]);
        a2.backends[0].state = BackendState::Terminating;
        let new = state(vec![a2, svc("ns/new:http", 82, &[(5, 1)])]);
        let d = diff(&old, &new);
        assert_eq!(d.added, vec!["ns/new:http"]);
        assert_eq!(d.removed, vec!["ns/gone:http"]);
        assert_eq!(d.changed.len(), 1);
        let c = &d.changed[0];
        assert_eq!(c.backends_added, vec!["10.244.0.4:8080"]);
        assert_eq!(c.backends_removed, vec!["10.244.0.1:8080"]);
        assert_eq!(c.backends_changed, vec!["10.244.0.2:8080"]);
        assert!(!c.settings_changed);
        assert_eq!(
            d.to_string(),
            "services +1 -1 ~1 (backends +1 -1 ~1): +ns/new:http, -ns/gone:http, ~ns/a:http"
        );
    }

    #[test]
    fn settings_change_is_a_change() {
        let old = state(vec![svc("ns/a:http", 80, &[(1, 1)])]);
        let mut s = svc("ns/a:http", 80, &[(1, 1)]);
        s.algorithm = Algorithm::RoundRobin;
        let d = diff(&old, &state(vec![s]));
        assert_eq!(d.changed.len(), 1);
        assert!(d.changed[0].settings_changed);
    }

    #[test]
    fn long_lists_are_cut() {
        let new = state(
            (0..12)
                .map(|i| svc(&format!("ns/s{i}:p"), 100 + i, &[]))
                .collect(),
        );
        let s = diff(&DesiredState::default(), &new).to_string();
        assert!(s.starts_with("services +12 -0 ~0"), "{s}");
        assert!(s.ends_with(", and 4 more"), "{s}");
    }
}
