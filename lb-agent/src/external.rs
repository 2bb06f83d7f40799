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
//! - the node port on every node address of the service's family
//!   (`--node-addresses`, or [`interface_addresses`] read at each apply: an
//!   IPv4 service's node port on the IPv4 addresses, an IPv6 service's
//!   (a dual-stack Service's `@ipv6` one) on the IPv6 ones);
//! - each external IP at the service's port (of the service's family: the
//!   controller and the validation see to it).
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
//! through this one. Each family has its own switch: IPv4 SNAT needs
//! `--snat-address`, IPv6 SNAT `--snat-address6` ([`NodeInfo::snat6`]),
//! both the ports; a family without is served as with SNAT off. The
//! userspace proxy proxies
//! (the backend sees the node's address), and prefers this node's backends
//! in the same way.
//!
//! [`HealthNodePorts`] serves `healthCheckNodePort` as kube-proxy does.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
    /// `--node-addresses` (IPv4 and IPv6); empty: the node's interfaces'
    /// addresses ([`interface_addresses`]), at each apply.
    pub addresses: Vec<IpAddr>,
    /// The kernel SNATs IPv4: IPv4 `Cluster` front ends use every backend,
    /// and those on other nodes are SNATed.
    pub snat: bool,
    /// The same for IPv6 (`--snat-address6`).
    pub snat6: bool,
}

impl NodeInfo {
    /// The addresses node ports are balanced on, both families.
    pub fn node_addresses(&self) -> Vec<IpAddr> {
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

    /// Whether the kernel SNATs the family of `ip`.
    fn snats(&self, ip: &IpAddr) -> bool {
        if ip.is_ipv4() { self.snat } else { self.snat6 }
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

/// The node's addresses in the calling thread's network namespace, sorted
/// (IPv4 first), without repeats: every IPv4 address but loopback, and every
/// IPv6 address of global scope (global and unique-local, not loopback,
/// not link-local) that is usable (not tentative: a bind to it fails until
/// duplicate address detection is done; not failed DAD). A tentative address
/// joins at the next apply after DAD.
pub fn interface_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = addresses_of(None)?.into_iter().map(IpAddr::from).collect();
    out.extend(ipv6_addresses()?.into_iter().map(IpAddr::from));
    out.sort();
    out.dedup();
    Ok(out)
}

/// `/proc/net/if_inet6`'s usable global-scope addresses (see
/// [`interface_addresses`]). No file (IPv6 off): none.
fn ipv6_addresses() -> std::io::Result<Vec<Ipv6Addr>> {
    Ok(parse_if_inet6(&read_if_inet6()?))
}

/// `/proc/net/if_inet6` of the calling thread's namespace (a thread may
/// have entered another); empty without the file (IPv6 off).
fn read_if_inet6() -> std::io::Result<String> {
    match std::fs::read_to_string("/proc/thread-self/net/if_inet6") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::read_to_string("/proc/self/net/if_inet6") {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                r => r,
            }
        }
        r => r,
    }
}

/// IPV6_ADDR_SCOPE_* 0x00: global (unique-local addresses too).
const SCOPE_GLOBAL: u8 = 0x00;
/// IFA_F_DADFAILED | IFA_F_TENTATIVE.
const UNUSABLE: u8 = 0x08 | 0x40;

/// Lines of `/proc/net/if_inet6`: `address ifindex prefixlen scope flags
/// name`, all hex but the name.
fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr, scope, flags) = (f.first()?, f.get(3)?, f.get(4)?);
            let addr = u128::from_str_radix(addr, 16)
                .ok()
                .filter(|_| addr.len() == 32)?;
            let scope = u8::from_str_radix(scope, 16).ok()?;
            // The kernel prints the flags' low byte; be lenient with wider ones.
            let flags = u32::from_str_radix(flags, 16).ok()? as u8;
            let ip = Ipv6Addr::from(addr);
            (scope == SCOPE_GLOBAL && flags & UNUSABLE == 0 && !ip.is_loopback()).then_some(ip)
        })
        .collect()
}

/// The first usable global-scope IPv6 address (as [`interface_addresses`]
/// takes them, in `/proc/net/if_inet6` order) of the interface `name`.
pub fn interface_address6(name: &str) -> std::io::Result<Option<Ipv6Addr>> {
    Ok(first_of_interface(&read_if_inet6()?, name))
}

/// The first usable global address of interface `name` in `/proc/net/if_inet6`'s `text`.
fn first_of_interface(text: &str, name: &str) -> Option<Ipv6Addr> {
    let mine: String = text
        .lines()
        .filter(|l| l.split_whitespace().nth(5) == Some(name))
        .map(|l| format!("{l}\n"))
        .collect();
    parse_if_inet6(&mine).into_iter().next()
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
        // The kernel SNATs the service's family.
        TrafficPolicy::Cluster if node.snats(&s.vip) => s.backends.clone(),
        TrafficPolicy::Cluster if local.iter().any(Backend::takes_new_flows) => local,
        TrafficPolicy::Cluster => s.backends.clone(),
    }
}

/// `state` with one more L4 service per external front end (the module
/// docs), named `<name> <address>:<port>` (`[<address>]:<port>` for IPv6).
/// A front end whose address is taken already (by a ClusterIP or an earlier
/// front end) is left out, with a warning. Used in both data paths: in eBPF mode the kernel serves the L4
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
        // The node port on the node's addresses of the service's family.
        let fronts = e
            .node_port
            .into_iter()
            .flat_map(|p| {
                addrs
                    .iter()
                    .filter(|a| a.is_ipv4() == s.vip.is_ipv4())
                    .map(move |a| (*a, p))
            })
            .chain(
                e.ips
                    .iter()
                    .filter(|ip| ip.is_ipv4() == s.vip.is_ipv4())
                    .map(|ip| (*ip, s.port)),
            );
        let mut backends = None;
        for (ip, port) in fronts {
            let svc = Service {
                // `[ip6]:port` for IPv6, as a socket address.
                name: format!("{} {}", s.name, SocketAddr::new(ip, port)),
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
            if e.traffic_policy == TrafficPolicy::Cluster && node.snats(&ip) {
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

/// One health-check node port's answer: the Service and its local endpoints,
/// per family (`None`: no service of that family has the port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Health {
    namespace: String,
    name: String,
    v4: Option<usize>,
    v6: Option<usize>,
}

impl Health {
    /// The local endpoints as seen by a check that came to an address of
    /// family `ipv4`: that family's, as kube-proxy's per-family proxiers
    /// answer on their own addresses (a dual-stack pod is one endpoint per
    /// family), else the other family's (a single-stack Service checked on
    /// an address of the other family).
    fn local_endpoints(&self, ipv4: bool) -> usize {
        let (mine, other) = if ipv4 {
            (self.v4, self.v6)
        } else {
            (self.v6, self.v4)
        };
        mine.or(other).unwrap_or(0)
    }
}

/// Per `healthCheckNodePort`: the Service (`namespace/name`, from the
/// service's name without `:port` and a family suffix) and its local
/// backends that take new flows, counted by IP over the Service's ports, per
/// family.
fn health_of(state: &DesiredState, node: &NodeInfo) -> BTreeMap<u16, Health> {
    type Ips = Option<BTreeSet<IpAddr>>;
    let mut ips: BTreeMap<u16, (String, Ips, Ips)> = BTreeMap::new();
    for s in &state.services {
        let Some(p) = s.external.health_check_node_port else {
            continue;
        };
        let svc = s.name.rsplit_once(':').map_or(&s.name[..], |(n, _)| n);
        let e = ips
            .entry(p)
            .or_insert_with(|| (svc.to_string(), None, None));
        let family = if s.vip.is_ipv4() { &mut e.1 } else { &mut e.2 };
        family.get_or_insert_default().extend(
            s.backends
                .iter()
                .filter(|b| node.is_local(b) && b.takes_new_flows())
                .map(|b| b.ip),
        );
    }
    ips.into_iter()
        .map(|(p, (svc, v4, v6))| {
            let (namespace, name) = svc.split_once('/').unwrap_or(("", &svc));
            let h = Health {
                namespace: namespace.to_string(),
                name: name.to_string(),
                v4: v4.map(|s| s.len()),
                v6: v6.map(|s| s.len()),
            };
            (p, h)
        })
        .collect()
}

/// A listener on every address of both families at `port`: `[::]` with
/// IPv6-only off (IPv4 clients arrive as v4-mapped addresses), else
/// `0.0.0.0` (IPv6 off in the kernel).
fn bind_any(port: u16) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let dual = || -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s)
    };
    let s = match dual() {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            s
        }
        Err(e) => return Err(e),
    };
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The health-check node ports: an HTTP server on every address of both
/// families (`[::]:port`, IPv4 too) per
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
            let l = match bind_any(p).and_then(tokio::net::TcpListener::from_std) {
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
            // The family of the node address the check came to.
            let ipv4 = c.local_addr().map_or(true, |a| match a.ip() {
                IpAddr::V4(_) => true,
                IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
            });
            let _ = c.write_all(response(&h, ipv4).as_bytes()).await;
            let _ = c.shutdown().await;
        });
    }
}

/// kube-proxy's answer (pkg/proxy/healthcheck/service_health.go), to a
/// check on an address of family `ipv4`.
fn response(h: &Health, ipv4: bool) -> String {
    let n = h.local_endpoints(ipv4);
    // kube-proxy's field order; strings escaped as JSON.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let body = format!(
        r#"{{"service":{{"namespace":{},"name":{}}},"localEndpoints":{},"serviceProxyHealthy":true}}"#,
        q(&h.namespace),
        q(&h.name),
        n
    );
    let status = if n > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        n,
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

    fn b6(last: u16, node: &str) -> Backend {
        Backend {
            node: Some(node.into()),
            ..Backend::new(
                std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, last),
                8080,
            )
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
            addresses: vec![
                Ipv4Addr::new(192, 168, 50, 1).into(),
                "fd00:50::1".parse().unwrap(),
                Ipv4Addr::new(10, 0, 0, 1).into(),
            ],
            snat: false,
            snat6: false,
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

    /// An IPv6 service's node port goes on the node's IPv6 addresses only,
    /// an IPv4 one's on its IPv4 addresses only: a front end never gets
    /// backends of the other family.
    #[test]
    fn node_ports_go_on_the_node_addresses_of_the_services_family() {
        let mut v6 = svc(TrafficPolicy::Local);
        v6.name = "ns/web:http@ipv6".into();
        v6.vip = "fd00:10:96::1".parse().unwrap();
        v6.backends = vec![b6(1, "a"), b6(2, "b")];
        v6.external.ips = vec!["fd00:60::1".parse().unwrap()];
        v6.external.node_port = Some(30081);
        let st = DesiredState {
            services: vec![svc(TrafficPolicy::Local), v6],
        };
        let out = expand(&st, &node("a"));
        for f in &out.services {
            assert!(
                f.backends.iter().all(|b| b.ip.is_ipv4() == f.vip.is_ipv4()),
                "{} at {} has backends of the other family: {:?}",
                f.name,
                f.vip,
                f.backends
            );
        }
        let names: Vec<&str> = out.services[2..].iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "ns/web:http 192.168.50.1:30080",
                "ns/web:http 10.0.0.1:30080",
                "ns/web:http 192.168.60.1:80",
                "ns/web:http@ipv6 [fd00:50::1]:30081",
                "ns/web:http@ipv6 [fd00:60::1]:80",
            ]
        );
        // Local: node a's IPv6 backend only.
        assert_eq!(out.services[5].backends, vec![b6(1, "a")]);
        assert_eq!(out.services[6].backends, vec![b6(1, "a")]);
    }

    /// Each family has its own SNAT switch: with IPv4 SNAT on and IPv6 SNAT
    /// off, an IPv6 `Cluster` front end is served as with SNAT off (this
    /// node's backends when it has any, else all, none SNATed); with IPv6
    /// SNAT on, it uses every backend and the other nodes' are SNATed.
    #[test]
    fn an_ipv6_cluster_front_end_is_snated_with_ipv6_snat_on() {
        let mut n = node("a");
        n.snat = true;
        let mut v6 = svc(TrafficPolicy::Cluster);
        v6.vip = "fd00:10:96::1".parse().unwrap();
        v6.backends = vec![b6(1, "a"), b6(2, "b")];
        v6.external.ips = vec!["fd00:60::1".parse().unwrap()];
        let st = DesiredState {
            services: vec![v6.clone()],
        };
        let (out, snat) = expand_snat(&st, &n);
        assert_eq!(out.services.len(), 3, "one IPv6 node address, one IP");
        assert!(snat.is_empty(), "{snat:?}");
        for f in &out.services[1..] {
            assert_eq!(f.backends, vec![b6(1, "a")], "{}", f.name);
        }
        // A node without IPv6 backends of its own: all, unSNATed.
        let (out, snat) = expand_snat(
            &st,
            &NodeInfo {
                snat: true,
                ..node("c")
            },
        );
        assert!(snat.is_empty());
        assert_eq!(out.services[1].backends, v6.backends);
        // IPv6 SNAT on: every backend, node b's SNATed on both front ends.
        n.snat = false;
        n.snat6 = true;
        let (out, snat) = expand_snat(&st, &n);
        let b = b6(2, "b");
        let mut want = SnatSet::new();
        for f in &out.services[1..] {
            assert_eq!(f.backends, v6.backends, "{}", f.name);
            want.insert((f.addr(), b.ip, b.port));
        }
        assert_eq!(snat, want);
        // And the IPv4 service stays unSNATed with IPv4 SNAT off.
        let (_, snat) = expand_snat(
            &DesiredState {
                services: vec![svc(TrafficPolicy::Cluster)],
            },
            &n,
        );
        assert!(snat.is_empty(), "{snat:?}");
    }

    /// `interface_address6`'s pick: the named interface's first usable
    /// global address (not link-local, not tentative, not another's).
    #[test]
    fn the_snat_address6_default_is_the_interfaces_first_usable_global_one() {
        let text = "fd000051000000000000000000000001 03 40 00 80 eth1\n\
                    fe800000000000000000000000000001 02 40 20 80 eth0\n\
                    fd000050000000000000000000000001 02 40 00 40 eth0\n\
                    fd000050000000000000000000000002 02 40 00 80 eth0\n\
                    fd000050000000000000000000000003 02 40 00 80 eth0\n";
        assert_eq!(
            first_of_interface(text, "eth0"),
            Some("fd00:50::2".parse::<Ipv6Addr>().unwrap())
        );
        assert_eq!(first_of_interface(text, "eth2"), None);
    }

    #[test]
    fn if_inet6_keeps_usable_global_addresses() {
        let text = "\
00000000000000000000000000000001 01 80 10 80       lo
fd000050000000000000000000000001 03 40 00 80     eth0
fe800000000000000000000000000001 03 40 20 80     eth0
fd000050000000000000000000000002 03 40 00 c0     eth0
fd000050000000000000000000000003 03 40 00 88     eth0
fd000050000000000000000000000004 03 40 00 a0     eth0
20010db8000000000000000000000005 04 40 00 00     eth1
fd0000500000000000000000000006 03 40 00 80     eth0
";
        let want: Vec<Ipv6Addr> = ["fd00:50::1", "fd00:50::4", "2001:db8::5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Not loopback, link-local, tentative (0x40), DAD-failed (0x08) or
        // malformed; deprecated (0x20) stays.
        assert_eq!(parse_if_inet6(text), want);
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
                v4: Some(2),
                v6: None,
            },
            "two local pods, counted once over both ports"
        );
        // An IPv4 Service checked on an IPv6 address: the same answer.
        assert_eq!(response(&h[&32000], false), response(&h[&32000], true));
        let r = response(&h[&32000], true);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("X-Load-Balancing-Endpoint-Weight: 2\r\n"));
        assert!(r.ends_with(
            r#"{"service":{"namespace":"ns","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        ), "{r}");
        let none = health_of(&st, &node("c"));
        assert!(response(&none[&32000], true).starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    }

    /// A dual-stack Service: each family counts its own endpoints (a pod
    /// with an address of each family is one endpoint per family, as on
    /// kube-proxy's per-family health servers), answered by the family of
    /// the address the check came to.
    #[test]
    fn health_counts_per_family() {
        let mut s = svc(TrafficPolicy::Local);
        s.external.health_check_node_port = Some(32000);
        let mut v6 = s.clone();
        v6.name = "ns/web:http@ipv6".into();
        v6.vip = "fd00:10:96::1".parse().unwrap();
        v6.backends = vec![b6(1, "a"), b6(2, "b")];
        let st = DesiredState {
            services: vec![s, v6],
        };
        let h = &health_of(&st, &node("a"))[&32000];
        assert_eq!((h.v4, h.v6), (Some(2), Some(1)));
        assert_eq!((h.name.as_str(), h.namespace.as_str()), ("web", "ns"));
        assert!(response(h, true).contains(r#""localEndpoints":2"#));
        assert!(response(h, false).contains(r#""localEndpoints":1"#));
        assert!(response(h, false).contains("X-Load-Balancing-Endpoint-Weight: 1\r\n"));
    }
}
