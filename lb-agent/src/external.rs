//! A service's external front ends on this node (Kubernetes NodePort,
//! externalIPs, LoadBalancer ingress IPs), and its health-check node port.
//!
//! The desired state says, per service, its node port, external IPs and
//! `externalTrafficPolicy` ([`lb_api::External`]); which addresses are this
//! node's is the agent's to know ([`NodeInfo`]). [`expand`] turns each front
//! end into one more service, keyed by (address, port, protocol) like a
//! ClusterIP, so the data paths need nothing new (a kernel entry in eBPF mode;
//! a listener of the userspace proxy in userspace mode and for gRPC-mode
//! services):
//!
//! - the node port on every node address (`--node-addresses`, or every IPv4
//!   address of the node's interfaces but loopback, read at each apply);
//! - each external IP at the service's port.
//!
//! With `externalTrafficPolicy: Local` a front end gets only the backends whose
//! `node` is this agent's `--node-name`: the client's address is kept (DNAT
//! only) and the reply leaves through this node's reverse NAT.
//!
//! With `Cluster`, a front end gets every backend, as kube-proxy's. In eBPF
//! mode with SNAT on (`--snat-address`, `--snat-ports`; [`NodeInfo::snat`]),
//! a new flow to a backend on another node is SNATed to the node's address
//! so that the reply comes back through this node ([`expand_snat`] names
//! those backends; lb-ebpf/src/snat.rs). A backend on this node, or whose
//! node is unknown, is DNATed only. With SNAT off, a front end with
//! `Cluster` uses this node's backends when it has any (then it behaves as
//! `Local`), and all the backends otherwise, unSNATed: the connections to
//! another node's backends then work only where that node routes the client
//! through this one. The userspace proxy proxies (the backend sees the
//! node's address), so there `Cluster` always means every backend.
//!
//! [`HealthNodePorts`] serves `healthCheckNodePort` as kube-proxy does.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use lb_api::{Backend, DesiredState, Service, TrafficPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// What the agent knows of its node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `--node-name`: backends with this `node` are local.
    pub name: Option<String>,
    /// `--node-addresses`; empty: every IPv4 address of the node's
    /// interfaces but loopback ([`interface_addresses`]), at each apply.
    pub addresses: Vec<Ipv4Addr>,
    /// `Cluster` front ends use every backend (the kernel SNATs those on
    /// other nodes, or the userspace proxy proxies them).
    pub snat: bool,
}

impl NodeInfo {
    /// The addresses node ports are balanced on.
    pub fn node_addresses(&self) -> Vec<Ipv4Addr> {
        if !self.addresses.is_empty() {
            return self.addresses.clone();
        }
        match interface_addresses() {
            Ok(a) => a,
            Err(e) => {
                warn!("cannot read the node's addresses, node ports are not balanced: {e}");
                Vec::new()
            }
        }
    }

    fn is_local(&self, b: &Backend) -> bool {
        self.name.is_some() && b.node == self.name
    }

    /// Whether `b` runs on another known node (SNATed from a `Cluster`
    /// front end).
    fn is_remote(&self, b: &Backend) -> bool {
        self.name.is_some() && b.node.is_some() && b.node != self.name
    }
}

/// Every IPv4 address of the calling thread's network namespace but
/// loopback, sorted, without repeats.
pub fn interface_addresses() -> std::io::Result<Vec<Ipv4Addr>> {
    Ok(addresses_of(None)?.into_iter().collect())
}

/// The first IPv4 address (as `getifaddrs` lists them: the primary first)
/// of the interface `name`, if it has one.
pub fn interface_address(name: &str) -> std::io::Result<Option<Ipv4Addr>> {
    Ok(addresses_of(Some(name))?.into_iter().next())
}

/// The IPv4 addresses but loopback of interface `only` (or of every one),
/// in `getifaddrs` order, without repeats.
fn addresses_of(only: Option<&str>) -> std::io::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string of the list.
        let named = only.is_none_or(|n| {
            !ifa.ifa_name.is_null()
                && unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_bytes() == n.as_bytes()
        });
        if named && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr; its family says which.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    if only.is_none() {
        out.sort();
    }
    Ok(out)
}

/// The backends of `s`'s external front ends on this node (see the module
/// docs for `Cluster`).
pub fn external_backends(s: &Service, node: &NodeInfo) -> Vec<Backend> {
    let local: Vec<Backend> = s
        .backends
        .iter()
        .filter(|b| node.is_local(b))
        .cloned()
        .collect();
    match s.external.traffic_policy {
        TrafficPolicy::Local => local,
        TrafficPolicy::Cluster if node.snat => s.backends.clone(),
        TrafficPolicy::Cluster if local.iter().any(Backend::takes_new_flows) => local,
        TrafficPolicy::Cluster => s.backends.clone(),
    }
}

/// `state` with one more L4 service per external front end (the module
/// docs), named `<name> <address>:<port>`. A front end whose address is taken
/// already (by a ClusterIP or an earlier front end) is left out, with a
/// warning. Used in both data paths: in eBPF mode the kernel serves the L4
/// front ends and the userspace proxy the gRPC-mode ones; in userspace mode
/// the proxy serves all of them (listening on node addresses and external
/// IPs; it proxies, so a backend sees the node's address even with `Local`).
pub fn expand(state: &DesiredState, node: &NodeInfo) -> DesiredState {
    expand_snat(state, node).0
}

/// (front end, backend ip, backend port) of each backend to SNAT.
pub type SnatSet = HashSet<(lb_api::ServiceAddr, std::net::IpAddr, u16)>;

/// [`expand`], and the backends of its `Cluster` front ends that run on
/// other nodes, which the kernel SNATs ([`NodeInfo::snat`]; empty without).
pub fn expand_snat(state: &DesiredState, node: &NodeInfo) -> (DesiredState, SnatSet) {
    let mut snat = SnatSet::new();
    if !state.services.iter().any(|s| s.external.any()) {
        return (state.clone(), snat);
    }
    let addrs = node.node_addresses();
    let mut taken: HashSet<_> = state.services.iter().map(Service::addr).collect();
    let mut out = state.services.clone();
    for s in &state.services {
        let e = &s.external;
        let fronts = e
            .node_port
            .into_iter()
            .flat_map(|p| addrs.iter().map(move |a| (std::net::IpAddr::from(*a), p)))
            .chain(e.ips.iter().map(|ip| (*ip, s.port)));
        let mut backends = None;
        for (ip, port) in fronts {
            let svc = Service {
                name: format!("{} {ip}:{port}", s.name),
                vip: ip,
                port,
                backends: backends
                    .get_or_insert_with(|| external_backends(s, node))
                    .clone(),
                health_check: None,
                external: Default::default(),
                ..s.clone()
            };
            if !taken.insert(svc.addr()) {
                warn!(
                    service = s.name,
                    "{ip}:{port} is taken already; front end left out"
                );
                continue;
            }
            if node.snat && e.traffic_policy == TrafficPolicy::Cluster && ip.is_ipv4() {
                snat.extend(
                    svc.backends
                        .iter()
                        .filter(|b| node.is_remote(b))
                        .map(|b| (svc.addr(), b.ip, b.port)),
                );
            }
            out.push(svc);
        }
    }
    (DesiredState { services: out }, snat)
}

/// One health-check node port's answer: the Service and its local endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Health {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

/// Per `healthCheckNodePort`: the Service (`namespace/name`, from the
/// service's name without `:port`) and its local backends that take new
/// flows, counted by IP over the Service's ports.
fn health_of(state: &DesiredState, node: &NodeInfo) -> BTreeMap<u16, Health> {
    let mut ips: BTreeMap<u16, (String, BTreeSet<std::net::IpAddr>)> = BTreeMap::new();
    for s in &state.services {
        let Some(p) = s.external.health_check_node_port else {
            continue;
        };
        let svc = s.name.rsplit_once(':').map_or(&s.name[..], |(n, _)| n);
        let e = ips
            .entry(p)
            .or_insert_with(|| (svc.to_string(), BTreeSet::new()));
        e.1.extend(
            s.backends
                .iter()
                .filter(|b| node.is_local(b) && b.takes_new_flows())
                .map(|b| b.ip),
        );
    }
    ips.into_iter()
        .map(|(p, (svc, ips))| {
            let (namespace, name) = svc.split_once('/').unwrap_or(("", &svc));
            let h = Health {
                namespace: namespace.to_string(),
                name: name.to_string(),
                local_endpoints: ips.len(),
            };
            (p, h)
        })
        .collect()
}

/// The health-check node ports: an HTTP server on 0.0.0.0:`port` per
/// `healthCheckNodePort`, answering as kube-proxy does: 200 when the Service
/// has local endpoints, 503 when it has none, with the JSON body
/// `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":true}`
/// and the header `X-Load-Balancing-Endpoint-Weight: N`.
#[derive(Default)]
pub struct HealthNodePorts {
    answers: Arc<Mutex<BTreeMap<u16, Health>>>,
    servers: Mutex<BTreeMap<u16, JoinHandle<()>>>,
}

impl HealthNodePorts {
    /// Follows `state`: opens the new ports, closes the gone ones, updates
    /// the counts. A port that cannot be bound is logged and tried again at
    /// the next apply. Needs a tokio runtime.
    pub fn update(&self, state: &DesiredState, node: &NodeInfo) {
        let want = health_of(state, node);
        let ports: BTreeSet<u16> = want.keys().copied().collect();
        *self.answers.lock().unwrap_or_else(|e| e.into_inner()) = want;
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers.retain(|p, task| {
            let keep = ports.contains(p);
            if !keep {
                task.abort();
                info!(port = p, "health-check node port closed");
            }
            keep
        });
        for p in ports {
            if servers.contains_key(&p) {
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, p));
            let l = match std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    warn!(port = p, "health-check node port: bind: {e}");
                    continue;
                }
            };
            info!(port = p, "serving a health-check node port");
            let answers = self.answers.clone();
            servers.insert(p, tokio::spawn(serve(l, p, answers)));
        }
    }
}

impl Drop for HealthNodePorts {
    fn drop(&mut self) {
        for t in self
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            t.abort();
        }
    }
}

async fn serve(l: tokio::net::TcpListener, port: u16, answers: Arc<Mutex<BTreeMap<u16, Health>>>) {
    loop {
        let Ok((mut c, _)) = l.accept().await else {
            continue;
        };
        let answers = answers.clone();
        tokio::spawn(async move {
            // Any request gets the answer: read its head (bounded in size and time), then reply.
            let read = async {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(std::time::Duration::from_secs(2), read).await,
                Ok(true)
            ) {
                return;
            }
            let h = answers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&port)
                .cloned()
                .unwrap_or_default();
            let _ = c.write_all(response(&h).as_bytes()).await;
            let _ = c.shutdown().await;
        });
    }
}

/// kube-proxy's answer (pkg/proxy/healthcheck/service_health.go).
fn response(h: &Health) -> String {
    // kube-proxy's field order; strings escaped as JSON.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let body = format!(
        r#"{{"service":{{"namespace":{},"name":{}}},"localEndpoints":{},"serviceProxyHealthy":true}}"#,
        q(&h.namespace),
        q(&h.name),
        h.local_endpoints
    );
    let status = if h.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        h.local_endpoints,
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_api::{Algorithm, BackendState, External, Protocol};

    /// The last octet of an IPv4 address (tests use IPv4 only).
    fn last_octet(ip: std::net::IpAddr) -> u8 {
        match ip {
            std::net::IpAddr::V4(v4) => v4.octets()[3],
            std::net::IpAddr::V6(v6) => v6.octets()[15],
        }
    }

    fn b(last: u8, node: &str) -> Backend {
        Backend {
            node: Some(node.into()),
            ..Backend::new(Ipv4Addr::new(10, 244, 0, last), 8080)
        }
    }

    fn svc(policy: TrafficPolicy) -> Service {
        let mut s = Service::new(
            "ns/web:http",
            Ipv4Addr::new(10, 96, 0, 1),
            80,
            Protocol::Tcp,
            Algorithm::RoundRobin,
            vec![b(1, "a"), b(2, "b"), b(3, "a")],
        );
        s.external = External {
            node_port: Some(30080),
            ips: vec![Ipv4Addr::new(192, 168, 60, 1).into()],
            traffic_policy: policy,
            health_check_node_port: None,
        };
        s
    }

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: Some(name.into()),
            addresses: vec![Ipv4Addr::new(192, 168, 50, 1), Ipv4Addr::new(10, 0, 0, 1)],
            snat: false,
        }
    }

    #[test]
    fn cluster_with_snat_uses_every_backend_and_snats_the_remote_ones() {
        let mut n = node("a");
        n.snat = true;
        let mut s = svc(TrafficPolicy::Cluster);
        s.backends
            .push(Backend::new(Ipv4Addr::new(10, 244, 0, 4), 8080));
        let st = DesiredState {
            services: vec![s.clone()],
        };
        let (out, snat) = expand_snat(&st, &n);
        assert_eq!(out.services.len(), 4);
        let mut want = SnatSet::new();
        for f in &out.services[1..] {
            assert_eq!(f.backends, s.backends, "every backend");
            // b2 is on node b; b4's node is unknown: DNAT only.
            want.insert((f.addr(), Ipv4Addr::new(10, 244, 0, 2).into(), 8080));
        }
        assert_eq!(snat, want);
        // Local: this node's backends, nothing SNATed.
        let st = DesiredState {
            services: vec![svc(TrafficPolicy::Local)],
        };
        let (out, snat) = expand_snat(&st, &n);
        assert_eq!(out.services[1].backends, vec![b(1, "a"), b(3, "a")]);
        assert!(snat.is_empty());
        // SNAT off: as before.
        let (_, snat) = expand_snat(
            &DesiredState {
                services: vec![svc(TrafficPolicy::Cluster)],
            },
            &node("a"),
        );
        assert!(snat.is_empty());
    }

    #[test]
    fn expand_adds_a_front_end_per_node_address_and_external_ip() {
        let st = DesiredState {
            services: vec![svc(TrafficPolicy::Local)],
        };
        let out = expand(&st, &node("a"));
        let fronts: Vec<(String, std::net::IpAddr, u16, Vec<u8>)> = out.services[1..]
            .iter()
            .map(|s| {
                let last = s.backends.iter().map(|b| last_octet(b.ip)).collect();
                (s.name.clone(), s.vip, s.port, last)
            })
            .collect();
        assert_eq!(
            fronts,
            vec![
                (
                    "ns/web:http 192.168.50.1:30080".into(),
                    Ipv4Addr::new(192, 168, 50, 1).into(),
                    30080,
                    vec![1, 3]
                ),
                (
                    "ns/web:http 10.0.0.1:30080".into(),
                    Ipv4Addr::new(10, 0, 0, 1).into(),
                    30080,
                    vec![1, 3]
                ),
                (
                    "ns/web:http 192.168.60.1:80".into(),
                    Ipv4Addr::new(192, 168, 60, 1).into(),
                    80,
                    vec![1, 3]
                ),
            ]
        );
        assert_eq!(
            out.services[0], st.services[0],
            "the ClusterIP is unchanged"
        );
        assert!(out.services[1..].iter().all(|s| !s.external.any()));
        // Node b has one local backend; a node without a name has none.
        assert_eq!(
            expand(&st, &node("b")).services[1].backends,
            vec![b(2, "b")]
        );
        let anon = NodeInfo {
            name: None,
            ..node("a")
        };
        assert!(expand(&st, &anon).services[1].backends.is_empty());
    }

    #[test]
    fn a_grpc_mode_service_keeps_its_mode_on_its_front_ends() {
        let mut s = svc(TrafficPolicy::Cluster);
        s.grpc = Some(lb_api::GrpcPolicy::default());
        let st = DesiredState {
            services: vec![s.clone()],
        };
        let out = expand(&st, &node("a"));
        assert_eq!(out.services.len(), 4, "two node ports and one external IP");
        assert!(out.services.iter().all(|f| f.grpc == s.grpc), "{out:?}");
    }

    #[test]
    fn cluster_prefers_local_backends_and_falls_back_to_all() {
        let s = svc(TrafficPolicy::Cluster);
        assert_eq!(external_backends(&s, &node("b")), vec![b(2, "b")]);
        assert_eq!(external_backends(&s, &node("c")), s.backends);
        // A local backend that takes no new flows does not count.
        let mut t = s.clone();
        t.backends[1].state = BackendState::Terminating;
        assert_eq!(external_backends(&t, &node("b")), t.backends);
    }

    #[test]
    fn a_taken_address_is_left_out() {
        let mut other = svc(TrafficPolicy::Cluster);
        other.name = "ns/other:http".into();
        other.vip = Ipv4Addr::new(192, 168, 60, 1).into();
        other.external = External::default();
        let st = DesiredState {
            services: vec![svc(TrafficPolicy::Cluster), other],
        };
        let out = expand(&st, &node("a"));
        assert_eq!(out.services.len(), 4, "two node ports, no external IP");
    }

    #[test]
    fn health_answers_as_kube_proxy() {
        let mut s = svc(TrafficPolicy::Local);
        s.external.health_check_node_port = Some(32000);
        let mut udp = s.clone();
        udp.name = "ns/web:dns".into();
        udp.protocol = Protocol::Udp;
        let st = DesiredState {
            services: vec![s, udp],
        };
        let h = health_of(&st, &node("a"));
        assert_eq!(
            h[&32000],
            Health {
                namespace: "ns".into(),
                name: "web".into(),
                local_endpoints: 2
            },
            "two local pods, counted once over both ports"
        );
        let r = response(&h[&32000]);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("X-Load-Balancing-Endpoint-Weight: 2\r\n"));
        assert!(r.ends_with(
            r#"{"service":{"namespace":"ns","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        ), "{r}");
        let none = health_of(&st, &node("c"));
        assert!(response(&none[&32000]).starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    }
}
