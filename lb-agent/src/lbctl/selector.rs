//! `lbctl selector`: the services' user-defined selectors (`list`, from the
//! agent's `/status`, with the kernel's selector counters from the pinned
//! maps), and the example selector's table (`geo add|del|list`, the pinned
//! LPM trie `<pin>/selectors/GEO_SUBNETS`; docs/policies.md).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::lpm_trie::Key;
use aya::maps::{LpmTrie, MapData};
use lb_agent::datapath::selector::SelectorStatus;
use lb_common::{geo, selector::MAX_CANDIDATES};
use serde::Serialize;

use super::table::{Table, left, right};

/// The selector counters (`selector_*` reasons). The kernel counts them
/// per node, not per service: they cannot be attributed to one service.
#[derive(Debug, Serialize)]
pub struct List {
    pub selectors: Vec<SelectorStatus>,
    /// `selector_chosen`, `selector_missing`, ... over every service of the
    /// node; `None` when the pinned maps could not be read (`counters_error`).
    pub counters: Option<Vec<(String, u64)>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters_error: Option<String>,
}

/// The `selector_*` reasons from the maps pinned at `pin`.
pub fn counters(pin: &Path) -> Result<Vec<(String, u64)>> {
    let r = super::open(pin)?;
    Ok(r.reasons()?
        .into_iter()
        .filter(|(n, _)| n.starts_with("selector_"))
        .map(|(n, v)| (n.to_string(), v))
        .collect())
}

pub fn list_table(l: &List) -> String {
    let mut out = String::new();
    if l.selectors.is_empty() {
        out.push_str("no service names a selector\n");
    } else {
        let mut t = Table::new(vec![left("SERVICE"), left("SELECTOR"), left("STATE")]);
        for s in &l.selectors {
            t.row(vec![s.service.clone(), s.selector.clone(), s.state.clone()]);
        }
        out.push_str(&t.render());
    }
    match (&l.counters, &l.counters_error) {
        (Some(c), _) => {
            let parts: Vec<String> = c.iter().map(|(n, v)| format!("{n} {v}")).collect();
            out.push_str(&format!(
                "counters (every selector service of the node together; the kernel does not count them per service): {}\n",
                parts.join(", ")
            ));
        }
        (None, Some(e)) => out.push_str(&format!("counters: not read ({e})\n")),
        (None, None) => {}
    }
    out
}

/// `<pin>/selectors/GEO_SUBNETS`.
pub fn geo_path(pin: &Path) -> PathBuf {
    lb_agent::datapath::selector::maps_dir(pin).join(geo::MAP)
}

type GeoTable = LpmTrie<MapData, geo::Subnet, geo::Mask>;

fn open_geo(pin: &Path) -> Result<GeoTable> {
    let p = geo_path(pin);
    if !p.exists() {
        bail!(
            "no example table at {}: no service uses example:geo yet (the agent pins the table \
             when it loads the example), or --pin-path is not the agent's",
            p.display()
        );
    }
    lb_agent::datapath::pin::check(pin)?;
    let md = MapData::from_pin(&p).with_context(|| format!("opening {}", p.display()))?;
    LpmTrie::try_from(aya::maps::Map::LpmTrie(md))
        .with_context(|| format!("{}: not the example's table", p.display()))
}

/// `A.B.C.D/LEN` (a bare address is /32): the subnet, its host bits cleared.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u32)> {
    let s = s.trim();
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (
            ip,
            len.parse::<u32>()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| anyhow!("{s:?}: the prefix length is 0-32"))?,
        ),
        None => (s, 32),
    };
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| anyhow!("{s:?} is not an IPv4 subnet (A.B.C.D/LEN)"))?;
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Ok((Ipv4Addr::from(u32::from(ip) & mask), len))
}

/// `0,1,5`: candidate indexes (the service's backends in order), each
/// below 16, as a [`geo::Mask`].
pub fn parse_backends(s: &str) -> Result<geo::Mask> {
    let mut mask: geo::Mask = 0;
    for part in s.split(',').map(str::trim) {
        let i: usize = part
            .parse()
            .ok()
            .filter(|i| *i < MAX_CANDIDATES)
            .ok_or_else(|| {
                anyhow!(
                    "{part:?} is not a backend index (0-{}, the service's backends in order)",
                    MAX_CANDIDATES - 1
                )
            })?;
        if mask & (1 << i) != 0 {
            bail!("backend index {i} is listed twice");
        }
        mask |= 1 << i;
    }
    Ok(mask)
}

fn key(net: Ipv4Addr, len: u32) -> Key<geo::Subnet> {
    Key::new(len, u32::from_ne_bytes(net.octets()))
}

/// One entry of the table.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct GeoEntry {
    pub subnet: String,
    pub backends: Vec<u32>,
}

fn indexes(mask: geo::Mask) -> Vec<u32> {
    (0..32).filter(|i| mask & (1 << i) != 0).collect()
}

/// Adds (or replaces) `cidr`'s entry: its clients go to `backends`.
pub fn geo_add(pin: &Path, cidr: &str, backends: &str) -> Result<GeoEntry> {
    let (net, len) = parse_cidr(cidr)?;
    let mask = parse_backends(backends)?;
    let mut t = open_geo(pin)?;
    t.insert(&key(net, len), mask, 0)
        .with_context(|| format!("writing {net}/{len}"))?;
    Ok(GeoEntry {
        subnet: format!("{net}/{len}"),
        backends: indexes(mask),
    })
}

/// Deletes `cidr`'s entry (its clients fall back to the built-in algorithm,
/// or to a shorter prefix that holds them).
pub fn geo_del(pin: &Path, cidr: &str) -> Result<String> {
    let (net, len) = parse_cidr(cidr)?;
    let mut t = open_geo(pin)?;
    match t.remove(&key(net, len)) {
        Ok(()) => Ok(format!("{net}/{len}")),
        // The kernel's ENOENT (aya passes the syscall's error on).
        Err(e)
            if matches!(e, aya::maps::MapError::KeyNotFound)
                || super::os_error(&e) == Some(libc::ENOENT) =>
        {
            bail!("no entry for {net}/{len}")
        }
        Err(e) => Err(anyhow!(e).context(format!("deleting {net}/{len}"))),
    }
}

/// Every entry, by address then prefix length.
pub fn geo_list(pin: &Path) -> Result<Vec<GeoEntry>> {
    let t = open_geo(pin)?;
    let mut rows = Vec::new();
    for kv in t.iter() {
        let (k, mask) = kv.context("reading the example's table")?;
        rows.push((Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len(), mask));
    }
    rows.sort();
    Ok(rows
        .into_iter()
        .map(|(net, len, mask)| GeoEntry {
            subnet: format!("{net}/{len}"),
            backends: indexes(mask),
        })
        .collect())
}

pub fn geo_table(rows: &[GeoEntry]) -> String {
    if rows.is_empty() {
        return "the example's table is empty (every client: the built-in algorithm)\n".into();
    }
    let mut t = Table::new(vec![left("SUBNET"), right("BACKENDS")]);
    for r in rows {
        let b: Vec<String> = r.backends.iter().map(u32::to_string).collect();
        t.row(vec![r.subnet.clone(), b.join(",")]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_and_backend_sets() {
        assert_eq!(
            parse_cidr("10.244.1.0/24").unwrap(),
            (Ipv4Addr::new(10, 244, 1, 0), 24)
        );
        assert_eq!(
            parse_cidr(" 10.244.1.77/24 ").unwrap(),
            (Ipv4Addr::new(10, 244, 1, 0), 24),
            "host bits cleared"
        );
        assert_eq!(
            parse_cidr("10.1.2.3").unwrap(),
            (Ipv4Addr::new(10, 1, 2, 3), 32)
        );
        assert_eq!(
            parse_cidr("10.1.2.3/0").unwrap(),
            (Ipv4Addr::UNSPECIFIED, 0)
        );
        for bad in ["10.1.2.3/33", "10.1.2/8", "fd00::/8", "x/8", "10.0.0.0/-1"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_backends("0,1").unwrap(), 0b11);
        assert_eq!(parse_backends(" 15 , 2").unwrap(), (1 << 15) | 0b100);
        for bad in ["", "16", "0,0", "a", "1,,2", "-1"] {
            assert!(parse_backends(bad).is_err(), "{bad:?}");
        }
        assert_eq!(indexes(0b1010), [1, 3]);
    }

    #[test]
    fn the_list_says_counters_are_per_node() {
        let l = List {
            selectors: vec![SelectorStatus {
                service: "lab/geo:http".into(),
                selector: "nosuch".into(),
                state: "selector nosuch: cannot read /x/nosuch.o: No such file".into(),
            }],
            counters: Some(vec![
                ("selector_chosen".into(), 20),
                ("selector_missing".into(), 0),
            ]),
            counters_error: None,
        };
        let t = list_table(&l);
        assert!(t.starts_with("SERVICE"), "{t}");
        assert!(
            t.contains("lab/geo:http  nosuch    selector nosuch: cannot read /x/nosuch.o"),
            "{t}"
        );
        assert!(
            t.contains("the kernel does not count them per service): selector_chosen 20, selector_missing 0"),
            "{t}"
        );
    }
}
