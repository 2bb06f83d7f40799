//! IPv6 on top of the one-node lab: each link `10.244.<net>.0/24` also gets
//! `fd00:10:244:<net>::/64` (node side `::1`, host side `::2`, `nodad`), and every host routes
//! the pods' `fd00:10:244::/48` and the VIPs' `fd00:10:96::/112` via the node. Everything stays
//! inside the lab's namespaces (ULA addresses only).

use super::{Host, Lab};
use anyhow::{Context, Result};
use std::net::Ipv6Addr;

/// The pods' IPv6 range and the VIPs' (inside the lab only).
pub const POD_NET6: &str = "fd00:10:244::/48";
pub const VIP_NET6: &str = "fd00:10:96::/112";

/// `fd00:10:244:<net>::<host>`.
pub fn pod_ip6(net: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(net), 0, 0, 0, host)
}

/// `fd00:10:96::<n>`: a VIP in the lab's IPv6 service range.
pub fn vip6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, n)
}

impl Host {
    /// The IPv4 network number (third octet) of this host's link.
    fn net(&self) -> u8 {
        self.ip().octets()[2]
    }

    /// This host's IPv6 address (after [`Lab::add_ipv6`]).
    pub fn ip6(&self) -> Ipv6Addr {
        pod_ip6(self.net(), 2)
    }

    /// The node's IPv6 address on this host's link.
    pub fn node_ip6(&self) -> Ipv6Addr {
        pod_ip6(self.net(), 1)
    }
}

impl Lab {
    /// Adds the IPv6 addresses and routes (see the module docs) to the client and every
    /// backend, and turns IPv6 forwarding on in the node namespace.
    pub fn add_ipv6(&self) -> Result<()> {
        self.node()
            .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])
            .context("IPv6 forwarding in the node")?;
        for h in std::iter::once(self.client()).chain(self.backends()) {
            let (node_ip, host_ip) = (h.node_ip6(), h.ip6());
            self.node()
                .ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{node_ip}/64"),
                    "dev",
                    &h.node_iface.name,
                    "nodad",
                ])
                .with_context(|| format!("node address {node_ip}"))?;
            h.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{host_ip}/64"),
                "dev",
                &h.iface.name,
                "nodad",
            ])
            .with_context(|| format!("host address {host_ip}"))?;
            for net in [POD_NET6, VIP_NET6] {
                h.ns.ip(&["-6", "route", "add", net, "via", &node_ip.to_string()])
                    .with_context(|| format!("route {net} in {}", h.ns.name()))?;
            }
        }
        Ok(())
    }
}
