//! The two-node lab: two node namespaces on a shared node network (a bridge in a `switch`
//! namespace), each with its own pods, its own bpffs and its own agent, and a client outside
//! the cluster on the node network.
//!
//! ```text
//!                      switch (bridge br0): the node network 192.168.50.0/24
//!          ┌──────────────────────┼──────────────────────┐
//!  node A 192.168.50.1     client 192.168.50.100     node B 192.168.50.2
//!   pods a<i> 10.244.(16+i).2/24                      pods b<i> 10.244.(32+i).2/24
//!   route 10.244.32.0/20 via B                        route 10.244.16.0/20 via A
//! ```
//! Node A's pod CIDR is 10.244.16.0/20, node B's 10.244.32.0/20. Pods route 10.244.0.0/16,
//! 10.96.0.0/16 (ClusterIPs) and the node network via their node. The client routes
//! [`EXTERNAL_NET`] (external and load-balancer IPs) via node A, as a router in front of a
//! cluster would. Nothing has a default route, so nothing can leave the lab. Every address
//! lives inside the lab's namespaces.
//!
//! [`TwoNodeLab::add_ipv6`] adds IPv6 beside it (ULA addresses only): the node network
//! `fd00:50::/64` (node A `::1`, B `::2`, the client `::100`), each pod link
//! `fd00:10:244:<net>::/64` as in the one-node lab (node side `::1`, pod `::2`; A's pods' nets
//! are `fd00:10:244:1x::`, B's `fd00:10:244:2x::`), and [`EXTERNAL_NET6`] and the VIPs'
//! `fd00:10:96::/112` routed by the client via node A.

use super::netns::{prefix_of, suffix};
use super::topology::NEXT_LAB;
use super::{BpfFs, Checksums, Host, Iface, Netns, Result, io_err, sys};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// The node network's first three octets: 192.168.50.0/24.
pub const NODE_NET: [u8; 3] = [192, 168, 50];
/// External and load-balancer IPs the client routes via node A: 192.168.60.0/24.
pub const EXTERNAL_NET: &str = "192.168.60.0/24";

/// The IPv6 node network: `fd00:50::/64`.
pub const NODE_NET6: &str = "fd00:50::/64";
/// IPv6 external and load-balancer IPs the client routes via node A.
pub const EXTERNAL_NET6: &str = "fd00:60::/64";

/// `fd00:50::<host>`: an address on the IPv6 node network.
pub fn node_ip6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, u16::from(host))
}

/// One node: its namespace, its address on the node network, its pods and its bpffs.
#[derive(Debug)]
pub struct Node {
    // Field order is drop order: bpffs first, the node namespace last.
    bpffs: BpfFs,
    pods: Vec<Host>,
    /// The node's end of its node-network link.
    pub link: Iface,
    /// `node-a` or `node-b`: its Kubernetes node name (`--node-name`).
    pub name: String,
    pub ns: Netns,
}

impl Node {
    /// The node's address on the node network.
    pub fn addr(&self) -> Ipv4Addr {
        self.link.ip
    }

    /// The node's IPv6 address on the node network (after [`TwoNodeLab::add_ipv6`]).
    pub fn addr6(&self) -> Ipv6Addr {
        node_ip6(self.link.ip.octets()[3])
    }

    /// Pod `i`, 1-based.
    pub fn pod(&self, i: usize) -> &Host {
        &self.pods[i - 1]
    }

    pub fn pods(&self) -> &[Host] {
        &self.pods
    }

    /// Where the agent attaches: the node-network link, then every pod veth's node end.
    pub fn ifaces(&self) -> Vec<String> {
        std::iter::once(&self.link)
            .chain(self.pods.iter().map(|p| &p.node_iface))
            .map(|i| i.name.clone())
            .collect()
    }

    /// Root of this node's private bpffs.
    pub fn bpffs(&self) -> PathBuf {
        self.bpffs.path()
    }

    /// The agent's pin path inside [`Self::bpffs`].
    pub fn pin_path(&self) -> PathBuf {
        self.bpffs().join("rpclb")
    }
}

/// The two-node topology. Dropping it (also while unwinding) unmounts both bpffs and deletes
/// every namespace.
#[derive(Debug)]
pub struct TwoNodeLab {
    client: Netns,
    client_iface: Iface,
    a: Node,
    b: Node,
    switch: Netns,
}

impl TwoNodeLab {
    /// `pods_per_node` (1..=15) pods on each node, full checksums on every pod and client veth.
    pub fn new(pods_per_node: usize) -> Result<TwoNodeLab> {
        assert!((1..=15).contains(&pods_per_node), "1..=15 pods per node");
        let gone = super::sweep_orphans();
        if !gone.is_empty() {
            tracing::warn!(?gone, "removed leftovers of dead test processes");
        }
        let pid = std::process::id();
        let id = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        // rt<pid%10000><lab%100>: 8 chars; with `n`, a role of 3 and an `s`, at most 13.
        let tag = format!("rt{:04}{:02}", pid % 10000, id % 100);

        let switch = Netns::new("switch")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::new("client")?;
        let client_iface = join_switch(&switch, &client, &format!("{tag}c"), 100, true)?;
        for net in [EXTERNAL_NET, "10.96.0.0/16"] {
            client.ip(&["route", "add", net, "via", &node_ip(1).to_string()])?;
        }
        let a = Self::node(&switch, &tag, "a", 1, 16, pods_per_node, id, pid)?;
        let b = Self::node(&switch, &tag, "b", 2, 32, pods_per_node, id, pid)?;
        a.ns.ip(&[
            "route",
            "add",
            "10.244.32.0/20",
            "via",
            &b.addr().to_string(),
        ])?;
        b.ns.ip(&[
            "route",
            "add",
            "10.244.16.0/20",
            "via",
            &a.addr().to_string(),
        ])?;
        tracing::info!(a = a.ns.name(), b = b.ns.name(), "two-node lab up");
        Ok(TwoNodeLab {
            client,
            client_iface,
            a,
            b,
            switch,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn node(
        switch: &Netns,
        tag: &str,
        letter: &str,
        host: u8,
        pod_base: u8,
        pods: usize,
        id: u32,
        pid: u32,
    ) -> Result<Node> {
        let ns = Netns::new(&format!("node{letter}"))?;
        let bpffs = BpfFs::mount(PathBuf::from(format!(
            "/run/{}lab{id}{letter}-{:04x}",
            prefix_of(pid),
            suffix()
        )))?;
        ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let link = join_switch(switch, &ns, &format!("{tag}{letter}"), host, false)?;
        let pods = (1..=pods)
            .map(|i| {
                let pod = Netns::new(&format!("{letter}{i}"))?;
                let role = format!("{letter}{i}");
                let h = Host::wire(
                    &ns,
                    pod,
                    tag,
                    &role,
                    pod_base + i as u8,
                    Checksums::Full,
                    true,
                )?;
                let gw = h.node_iface.ip.to_string();
                let net = format!("{}.{}.{}.0/24", NODE_NET[0], NODE_NET[1], NODE_NET[2]);
                h.ns.ip(&["route", "add", &net, "via", &gw])?;
                Ok(h)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Node {
            bpffs,
            pods,
            link,
            name: format!("node-{letter}"),
            ns,
        })
    }

    pub fn a(&self) -> &Node {
        &self.a
    }

    pub fn b(&self) -> &Node {
        &self.b
    }

    pub fn nodes(&self) -> [&Node; 2] {
        [&self.a, &self.b]
    }

    /// The client outside the cluster, on the node network.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        self.client_iface.ip
    }

    /// The client's IPv6 address (after [`Self::add_ipv6`]).
    pub fn client_ip6(&self) -> Ipv6Addr {
        node_ip6(self.client_iface.ip.octets()[3])
    }

    /// Adds IPv6 (see the module docs): addresses (`nodad`), routes and forwarding, then
    /// waits until no address in the lab is tentative: for about a second after a link comes
    /// up its link-local address is, and meanwhile a node sends no neighbour solicitation for
    /// a packet it forwards (tests/src/lab/ipv6.rs).
    pub fn add_ipv6(&self) -> Result<()> {
        let add = |ns: &Netns, addr: String, dev: &str| {
            ns.ip(&["-6", "addr", "add", &addr, "dev", dev, "nodad"])
                .map(drop)
        };
        let route = |ns: &Netns, net: &str, via: Ipv6Addr| {
            ns.ip(&["-6", "route", "add", net, "via", &via.to_string()])
                .map(drop)
        };
        let (a6, b6) = (self.a.addr6(), self.b.addr6());
        add(
            &self.client,
            format!("{}/64", self.client_ip6()),
            &self.client_iface.name,
        )?;
        for net in [EXTERNAL_NET6, super::ipv6::VIP_NET6] {
            route(&self.client, net, a6)?;
        }
        for (node, other_pods, via) in [
            (&self.a, "fd00:10:244:20::/60", b6),
            (&self.b, "fd00:10:244:10::/60", a6),
        ] {
            node.ns
                .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
            add(&node.ns, format!("{}/64", node.addr6()), &node.link.name)?;
            route(&node.ns, other_pods, via)?;
            for p in &node.pods {
                add(&node.ns, format!("{}/64", p.node_ip6()), &p.node_iface.name)?;
                add(&p.ns, format!("{}/64", p.ip6()), &p.iface.name)?;
                for net in [super::ipv6::POD_NET6, super::ipv6::VIP_NET6, NODE_NET6] {
                    route(&p.ns, net, p.node_ip6())?;
                }
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let nodes = [&self.a, &self.b];
        let all = std::iter::once(&self.client).chain(
            nodes
                .into_iter()
                .flat_map(|n| std::iter::once(&n.ns).chain(n.pods.iter().map(|p| &p.ns))),
        );
        for ns in all {
            loop {
                let t = ns.ip(&["-6", "-o", "addr", "show", "tentative"])?;
                if t.trim().is_empty() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(io_err(format!(
                        "still tentative after 10 s in {}",
                        ns.name()
                    ))(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Every namespace name.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut v = vec![self.switch.name(), self.client.name()];
        for n in [&self.a, &self.b] {
            v.push(n.ns.name());
            v.extend(n.pods.iter().map(|p| p.ns.name()));
        }
        v
    }
}

/// 192.168.50.`host`.
pub fn node_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(NODE_NET[0], NODE_NET[1], NODE_NET[2], host)
}

/// A veth from `ns` (named `name`, address 192.168.50.`host`/24) to the bridge in `switch`
/// (named `<name>s`, GRO on so that native XDP redirects into the pair are taken). `full`:
/// tx checksum offload off on `ns`'s end.
fn join_switch(switch: &Netns, ns: &Netns, name: &str, host: u8, full: bool) -> Result<Iface> {
    let port = format!("{name}s");
    // Created in the switch with its peer straight in `ns`: never in the root namespace.
    switch.ip(&[
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        name,
        "netns",
        ns.name(),
    ])?;
    switch.ip(&["link", "set", &port, "master", "br0"])?;
    switch.ip(&["link", "set", &port, "up"])?;
    let ip = node_ip(host);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", name])?;
    ns.ip(&["link", "set", name, "up"])?;
    switch
        .run(|| sys::ethtool_set(&port, sys::ETHTOOL_SGRO, true))?
        .map_err(io_err(format!("gro on {port}")))?;
    let name2 = name.to_string();
    ns.run(move || -> std::io::Result<Iface> {
        if full {
            sys::ethtool_set(&name2, sys::ETHTOOL_STXCSUM, false)?;
        }
        Ok(Iface {
            ifindex: sys::ifindex(&name2)?,
            mac: sys::mac(&name2)?,
            name: name2.clone(),
            ip,
        })
    })?
    .map_err(io_err(format!("configure {name} in {}", ns.name())))
}

/// Identity of pod `i` of `node` (`a1`, `b2`, ...), as the tests' servers
/// answer.
pub fn ident(node: &Node, i: usize) -> String {
    format!("{}{i}", &node.name["node-".len()..])
}

/// `n` TCP connections from `ns` to `target` (IPv4 or IPv6), each one's reply (a failure
/// panics, naming the attempt).
pub fn tcp_from(
    ns: &Netns,
    target: impl Into<std::net::SocketAddr>,
    n: usize,
) -> Vec<super::Reply> {
    let target: std::net::SocketAddr = target.into();
    ns.run(|| super::tcp_attempts(target, n, super::Limits::default()))
        .expect("namespace")
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.unwrap_or_else(|e| panic!("TCP {k} to {target}: {e}")))
        .collect()
}

/// How many replies each backend gave.
pub fn counts(replies: &[super::Reply]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for r in replies {
        *m.entry(r.backend.clone()).or_default() += 1;
    }
    m
}
