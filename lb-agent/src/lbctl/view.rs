//! What each lbctl command shows, read from the pinned maps, as serializable
//! rows (the `-o json` shape) and as tables.
//!
//! JSON field names are part of lbctl's interface: add fields, never rename.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use lb_agent::datapath::MapReader;
use lb_agent::datapath::reader::{ServiceInfo, ip_from_wire, monotonic_ns};
use lb_agent::gc;
use lb_api::{Protocol, ServiceAddr};
use lb_common::{FlowKey, ct_flags, ct_state};
use serde::Serialize;

use super::table::{self, Table, capped, left, right};

/// Width cap of name columns (names can be 252 bytes).
const NAME_W: usize = 34;

// ---------------------------------------------------------------- services --

#[derive(Clone, Debug, Serialize)]
pub struct ServiceRow {
    pub name: String,
    pub address: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: String,
    pub backends_active: usize,
    pub backends_terminating: usize,
    pub new_flows: u64,
    pub active_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub table_size: u32,
    pub affinity_timeout_seconds: u32,
}

pub fn services(w: &MapReader) -> Result<Vec<ServiceRow>> {
    let mut rows = Vec::new();
    let pending = w.pending_counts()?;
    for s in sorted(w.services()) {
        let st = w.service_stats_with(&s.addr, &pending)?;
        let active = w
            .backend_stats_with(&s.addr, &pending)?
            .iter()
            .map(|b| b.active)
            .sum();
        rows.push(ServiceRow {
            name: s.name.clone(),
            address: s.addr.to_string(),
            vip: s.addr.vip,
            port: s.addr.port,
            protocol: s.addr.protocol,
            algorithm: s.algorithm.to_string(),
            backends_active: s.backends_active,
            backends_terminating: s.backends_terminating,
            new_flows: st.new_flows,
            active_flows: active,
            packets: st.packets,
            bytes: st.bytes,
            drops: st.drops,
            table_size: s.table_len,
            affinity_timeout_seconds: s.affinity_timeout_s,
        });
    }
    Ok(rows)
}

pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut t = Table::new(vec![
        capped("NAME", NAME_W),
        left("ADDRESS"),
        left("ALGORITHM"),
        right("UP"),
        right("TERM"),
        right("NEW"),
        right("ACTIVE"),
        right("PACKETS"),
        right("BYTES"),
    ]);
    for r in rows {
        t.row(vec![
            r.name.clone(),
            r.address.clone(),
            r.algorithm.clone(),
            r.backends_active.to_string(),
            r.backends_terminating.to_string(),
            table::count(r.new_flows),
            table::count(r.active_flows),
            table::count(r.packets),
            table::bytes(r.bytes),
        ]);
    }
    if t.is_empty() {
        return "no services\n".into();
    }
    t.render()
}

fn sorted(mut v: Vec<ServiceInfo>) -> Vec<ServiceInfo> {
    v.sort_by(|a, b| a.name.cmp(&b.name).then(a.addr.cmp(&b.addr)));
    v
}

/// Finds a service by `namespace/name:port`, by `VIP:port[/proto]`, or by
/// `namespace/name` when only one of its ports matches.
pub fn resolve(svcs: &[ServiceInfo], spec: &str) -> Result<ServiceInfo> {
    if let Some(s) = svcs.iter().find(|s| s.name == spec) {
        return Ok(s.clone());
    }
    let by_addr: Option<Vec<&ServiceInfo>> = parse_addr(spec).map(|(vip, port, proto)| {
        svcs.iter()
            .filter(|s| {
                s.addr.vip == vip
                    && s.addr.port == port
                    && proto.is_none_or(|p| p == s.addr.protocol)
            })
            .collect()
    });
    let candidates: Vec<&ServiceInfo> = match by_addr {
        Some(v) => v,
        None => svcs
            .iter()
            .filter(|s| {
                s.name
                    .rsplit_once(':')
                    .is_some_and(|(base, _)| base == spec)
            })
            .collect(),
    };
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("no service matches {spec:?} (`lbctl services` lists them)"),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|s| format!("{} ({})", s.name, s.addr))
                .collect();
            bail!(
                "{spec:?} matches {} services: {}; name one",
                many.len(),
                names.join(", ")
            )
        }
    }
}

/// `VIP:port` or `VIP:port/proto`; an IPv6 VIP in brackets (`[fd00::1]:80`).
fn parse_addr(s: &str) -> Option<(IpAddr, u16, Option<Protocol>)> {
    let (hostport, proto) = match s.rsplit_once('/') {
        Some((hp, p)) => (hp, Some(p)),
        None => (s, None),
    };
    let sa: SocketAddr = hostport.parse().ok()?;
    let (ip, port) = (sa.ip(), sa.port());
    let proto = match proto {
        None => None,
        Some("tcp") => Some(Protocol::Tcp),
        Some("udp") => Some(Protocol::Udp),
        Some(_) => return None,
    };
    Some((ip, port, proto))
}

// ---------------------------------------------------------------- backends --

#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub service: String,
    pub service_address: String,
    pub address: String,
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: String,
    pub active: u64,
    /// Its QoS limit of `active` (docs/policies.md); null: none.
    pub limit: Option<u32>,
    pub new_flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

pub fn backends(w: &MapReader, only: Option<&ServiceAddr>) -> Result<Vec<BackendRow>> {
    let mut rows = Vec::new();
    let pending = w.pending_counts()?;
    for s in sorted(w.services()) {
        if only.is_some_and(|a| *a != s.addr) {
            continue;
        }
        for b in w.backend_stats_with(&s.addr, &pending)? {
            rows.push(BackendRow {
                service: s.name.clone(),
                service_address: s.addr.to_string(),
                address: SocketAddr::new(b.ip, b.port).to_string(),
                ip: b.ip,
                port: b.port,
                weight: b.weight,
                state: b.state.to_string(),
                active: b.active,
                limit: b.limit,
                new_flows: b.new_flows,
                packets: b.packets,
                bytes: b.bytes,
            });
        }
    }
    Ok(rows)
}

pub fn backends_table(rows: &[BackendRow]) -> String {
    let mut t = Table::new(vec![
        capped("SERVICE", NAME_W),
        left("BACKEND"),
        right("WEIGHT"),
        left("STATE"),
        right("ACTIVE"),
        right("NEW"),
        right("PACKETS"),
        right("BYTES"),
    ]);
    for r in rows {
        t.row(vec![
            r.service.clone(),
            r.address.clone(),
            r.weight.to_string(),
            r.state.clone(),
            with_limit(r.active, r.limit),
            table::count(r.new_flows),
            table::count(r.packets),
            table::bytes(r.bytes),
        ]);
    }
    if t.is_empty() {
        return "no backends\n".into();
    }
    t.render()
}

/// `active`, or `active/limit` for a backend with a QoS limit.
pub fn with_limit(active: u64, limit: Option<u32>) -> String {
    match limit {
        Some(l) => format!("{}/{l}", table::count(active)),
        None => table::count(active),
    }
}

// --------------------------------------------------------------- conntrack --

#[derive(Clone, Debug, Serialize)]
pub struct FlowRow {
    pub client: String,
    /// The source port the backend sees when the kernel rewrote the
    /// client's (a reverse-conntrack collision, or a SNATed flow's SNAT
    /// port); null otherwise.
    pub backend_sees_port: Option<u16>,
    /// How the flow is translated (`lb_common::ct_flags`): `dnat` (the
    /// backend sees the client's address), `snat` (a `Cluster` front end's
    /// flow to another node's backend, SNATed to the node's address) or
    /// `hairpin` (a pod reaching itself, SNATed to the service loopback).
    pub nat: &'static str,
    /// The source address the backend sees for a SNATed flow (`snat`,
    /// `hairpin`); null otherwise, or when its reverse entry is gone
    /// (IPv4 keeps the address there only).
    pub backend_sees_address: Option<String>,
    pub service: String,
    pub vip: String,
    pub backend: String,
    pub protocol: Protocol,
    pub state: String,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    pub created_ns: u64,
    pub last_seen_ns: u64,
}

/// Which flows to show.
#[derive(Default)]
pub struct FlowFilter {
    pub service: Option<ServiceAddr>,
    pub backend: Option<(Ipv4Addr, Option<u16>)>,
}

/// Parses `IP` or `IP:port`.
pub fn parse_backend(s: &str) -> Result<(Ipv4Addr, Option<u16>)> {
    let (ip, port) = match s.split_once(':') {
        Some((ip, p)) => (
            ip,
            Some(
                p.parse::<u16>()
                    .with_context(|| format!("bad port in --backend {s:?}"))?,
            ),
        ),
        None => (s, None),
    };
    let ip = ip
        .parse()
        .map_err(|_| anyhow!("--backend {s:?} is not an IPv4 address (IP or IP:port)"))?;
    Ok((ip, port))
}

/// Every flow, from one batched walk of the map. A flow is its forward
/// entry; its idle time counts its own reverse entry's last-seen too (a
/// SNATed flow's as well, found by the reverse entry's owner).
pub fn conntrack(w: &MapReader, f: &FlowFilter) -> Result<(Vec<FlowRow>, u64)> {
    let scan = gc::scan(w).context("reading CONNTRACK")?;
    let entries = scan.scanned;
    let now = monotonic_ns();
    let names: HashMap<ServiceAddr, String> =
        w.services().into_iter().map(|s| (s.addr, s.name)).collect();
    // An IPv4 SNATed flow's address is in its reverse key only.
    let snat_rev: HashMap<FlowKey, FlowKey> = scan
        .reverse
        .iter()
        .filter_map(|(r, e)| e.owner.map(|f| (f, *r)))
        .collect();
    let reverse = scan.reverse_map();
    let mut rows = Vec::new();
    for (k, v) in &scan.forward {
        let protocol = if k.proto == 17 {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        let vip = ServiceAddr {
            vip: ip_from_wire(k.dst_ip).into(),
            port: u16::from_be(k.dst_port),
            protocol,
        };
        let backend = (ip_from_wire(v.nat_ip), u16::from_be(v.nat_port));
        if f.service.is_some_and(|s| s != vip) {
            continue;
        }
        if let Some((ip, port)) = f.backend
            && (ip != backend.0 || port.is_some_and(|p| p != backend.1))
        {
            continue;
        }
        // As the GC pairs them (`gc::plan`): a SNATed flow's reverse key
        // ends at the SNAT address, which the forward entry does not hold.
        let rk = match snat_rev.get(k) {
            Some(rk) if v.flags & ct_flags::SNAT != 0 => *rk,
            _ => k.reverse_of_forward(v),
        };
        let rev_seen = reverse
            .get(&rk)
            .filter(|e| e.owner == Some(*k))
            .map_or(0, |e| e.last_seen);
        let last = v.last_seen_ns.max(rev_seen);
        // By address, not by the entry's service id: ids of removed
        // services are reused, so an old flow's id may name another service.
        let service = names
            .get(&vip)
            .cloned()
            .unwrap_or_else(|| "(removed service)".to_string());
        let client: (IpAddr, u16) = (ip_from_wire(k.src_ip).into(), u16::from_be(k.src_port));
        rows.push((
            service.clone(),
            client,
            FlowRow {
                client: format!("{}:{}", client.0, client.1),
                backend_sees_port: (v.client_port != 0).then(|| u16::from_be(v.client_port)),
                nat: nat_name(v.flags),
                backend_sees_address: (v.flags & ct_flags::SNAT != 0)
                    .then(|| snat_rev.get(k))
                    .flatten()
                    .map(|r| ip_from_wire(r.dst_ip).to_string()),
                service,
                vip: format!("{}:{}", vip.vip, vip.port),
                backend: format!("{}:{}", backend.0, backend.1),
                protocol,
                state: ct_state::name(v.state).to_string(),
                age_seconds: secs(now.saturating_sub(v.created_ns)),
                idle_seconds: secs(now.saturating_sub(last)),
                created_ns: v.created_ns,
                last_seen_ns: last,
            },
        ));
    }
    // The IPv6 flows (`CONNTRACK6`); a `--backend` filter is IPv4.
    let flows6 = if f.backend.is_some() {
        Vec::new()
    } else {
        w.conntrack6().context("reading CONNTRACK6")?
    };
    for e in flows6 {
        let vip = ServiceAddr {
            vip: e.vip.0.into(),
            port: e.vip.1,
            protocol: e.proto,
        };
        if f.service.is_some_and(|s| s != vip) {
            continue;
        }
        let service = names
            .get(&vip)
            .cloned()
            .unwrap_or_else(|| "(removed service)".to_string());
        let client: (IpAddr, u16) = (e.client.0.into(), e.client.1);
        let last = e.last_seen_ns.max(e.reverse_seen_ns.unwrap_or(0));
        rows.push((
            service.clone(),
            client,
            FlowRow {
                client: SocketAddr::from(client).to_string(),
                backend_sees_port: e.backend_sees,
                nat: nat_name(e.flags),
                backend_sees_address: e.snat_address.map(|a| a.to_string()),
                service,
                vip: SocketAddr::from(e.vip).to_string(),
                backend: SocketAddr::from(e.backend).to_string(),
                protocol: e.proto,
                state: e.state.to_string(),
                age_seconds: secs(now.saturating_sub(e.created_ns)),
                idle_seconds: secs(now.saturating_sub(last)),
                created_ns: e.created_ns,
                last_seen_ns: last,
            },
        ));
    }
    // By service name, then client address (numerically).
    rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    Ok((rows.into_iter().map(|(_, _, r)| r).collect(), entries))
}

/// `FlowRow::nat` of an entry with `ct_flags` `flags`.
fn nat_name(flags: u8) -> &'static str {
    if flags & ct_flags::HAIRPIN != 0 {
        "hairpin"
    } else if flags & ct_flags::SNAT != 0 {
        "snat"
    } else {
        "dnat"
    }
}

fn secs(ns: u64) -> f64 {
    // Millisecond precision is plenty and keeps the JSON short.
    (ns / 1_000_000) as f64 / 1000.0
}

/// `total` is the number of flows that matched, before `--limit`.
/// `capacity`: the map's max_entries; a footer line shows the fill.
pub fn conntrack_table(rows: &[FlowRow], total: usize, entries: u64, capacity: u32) -> String {
    let mut t = Table::new(vec![
        left("CLIENT"),
        capped("SERVICE", 30),
        left("BACKEND"),
        left("PROTO"),
        left("STATE"),
        right("AGE"),
        right("IDLE"),
    ]);
    for r in rows {
        // What the backend sees, when it is not the client's own ip:port.
        let port = r.backend_sees_port.map_or(String::new(), |p| p.to_string());
        let client = match (r.nat, &r.backend_sees_address) {
            ("dnat", _) if port.is_empty() => r.client.clone(),
            ("dnat", _) => format!("{} (as :{port})", r.client),
            (nat, Some(a)) if a.contains(':') => format!("{} ({nat} as [{a}]:{port})", r.client),
            (nat, Some(a)) => format!("{} ({nat} as {a}:{port})", r.client),
            (nat, None) => format!("{} ({nat} as :{port})", r.client),
        };
        t.row(vec![
            client,
            r.service.clone(),
            r.backend.clone(),
            r.protocol.to_string(),
            r.state.clone(),
            table::duration(Duration::from_secs_f64(r.age_seconds)),
            table::duration(Duration::from_secs_f64(r.idle_seconds)),
        ]);
    }
    let plural = if total == 1 { "" } else { "s" };
    let summary = if rows.len() == total {
        format!("{total} flow{plural} ({entries} conntrack entries)\n")
    } else {
        format!(
            "{} of {total} flow{plural} shown ({entries} conntrack entries)\n",
            rows.len()
        )
    };
    let pct = (entries * 100).checked_div(capacity as u64).unwrap_or(0);
    let summary =
        format!("{summary}conntrack map: {entries} of {capacity} entries ({pct}% full)\n");
    if t.is_empty() {
        return summary;
    }
    t.render() + &summary
}

// ------------------------------------------------------------------ maglev --

#[derive(Clone, Debug, Serialize)]
pub struct TableShare {
    pub address: String,
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: String,
    pub entries: u64,
    pub share_pct: f64,
    /// Share the weights ask for (among backends that take new flows).
    pub expected_pct: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MaglevView {
    pub service: String,
    pub address: String,
    pub algorithm: String,
    /// `maglev` (a Maglev lookup table) or `weighted` (a weighted slot list).
    pub kind: &'static str,
    pub table_size: u64,
    pub backends: Vec<TableShare>,
}

pub fn maglev(w: &MapReader, s: &ServiceInfo) -> Result<MaglevView> {
    let table = w.service_table(&s.addr)?;
    let mut counts: HashMap<u32, u64> = HashMap::new();
    for id in &table {
        *counts.entry(*id).or_default() += 1;
    }
    let bs = w.backend_stats(&s.addr)?;
    let live_weight: u64 = bs
        .iter()
        .filter(|b| b.state == "active")
        .map(|b| b.weight as u64)
        .sum();
    let n = table.len() as u64;
    let pct_of = |x: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            (x as f64 * 10_000.0 / of as f64).round() / 100.0
        }
    };
    let mut backends: Vec<TableShare> = bs
        .iter()
        .map(|b| {
            let entries = counts.remove(&b.id).unwrap_or(0);
            let live = b.state == "active";
            TableShare {
                address: SocketAddr::new(b.ip, b.port).to_string(),
                ip: b.ip,
                port: b.port,
                weight: b.weight,
                state: b.state.to_string(),
                entries,
                share_pct: pct_of(entries, n),
                expected_pct: if live {
                    pct_of(b.weight as u64, live_weight)
                } else {
                    0.0
                },
            }
        })
        .collect();
    // Slots naming no backend of this service would be a writer bug; show
    // them rather than hide them.
    let mut stray: Vec<(u32, u64)> = counts.into_iter().collect();
    stray.sort_unstable();
    for (id, entries) in stray {
        backends.push(TableShare {
            address: format!("(not a backend of this service: slot value {id})"),
            ip: Ipv4Addr::UNSPECIFIED.into(),
            port: 0,
            weight: 0,
            state: "unknown".into(),
            entries,
            share_pct: pct_of(entries, n),
            expected_pct: 0.0,
        });
    }
    Ok(MaglevView {
        service: s.name.clone(),
        address: s.addr.to_string(),
        algorithm: s.algorithm.to_string(),
        kind: if s.algorithm.uses_maglev_table() {
            "maglev"
        } else {
            "weighted"
        },
        table_size: n,
        backends,
    })
}

pub fn maglev_table(v: &MaglevView) -> String {
    let mut out = format!(
        "service {} ({}), {}: {} table, {} entries\n",
        v.service, v.address, v.algorithm, v.kind, v.table_size
    );
    if v.table_size == 0 {
        out.push_str("empty table: no backend takes new flows\n");
    }
    let mut t = Table::new(vec![
        left("BACKEND"),
        right("WEIGHT"),
        left("STATE"),
        right("ENTRIES"),
        right("SHARE"),
        right("EXPECTED"),
    ]);
    for b in &v.backends {
        t.row(vec![
            b.address.clone(),
            b.weight.to_string(),
            b.state.clone(),
            b.entries.to_string(),
            table::pct(b.share_pct),
            table::pct(b.expected_pct),
        ]);
    }
    if !t.is_empty() {
        out.push_str(&t.render());
    }
    out
}

// ------------------------------------------------------------------- stats --

/// One reading of every counter.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at_ns: u64,
    pub reasons: Vec<(&'static str, u64)>,
    /// Service address -> (name, counters).
    pub services: BTreeMap<ServiceAddr, (String, lb_agent::datapath::ServiceStats)>,
    pub conntrack_entries: u64,
}

pub fn sample(w: &MapReader) -> Result<Sample> {
    let pending = w.pending_counts()?;
    let reasons = w.reasons_with(&pending)?;
    let mut services = BTreeMap::new();
    for s in w.services() {
        let st = w.service_stats_with(&s.addr, &pending)?;
        services.insert(s.addr, (s.name, st));
    }
    let conntrack_entries =
        gc::for_each_entry(w.conntrack_fd(), |_, _| {}).context("reading CONNTRACK")?;
    Ok(Sample {
        at_ns: monotonic_ns(),
        reasons,
        services,
        conntrack_entries,
    })
}

/// A reason's kind: its prefix, as in the agent's metrics (`kind` label of
/// `rpclb_datapath_events_total`): `nat` (translated to or from a backend),
/// `fwd` (sent out with a FIB redirect), `pass` (handed to the stack),
/// `drop`, `tx` (answered: a RST for a service without backends), `ct` (a
/// conntrack event beside the packet's outcome: a source-port rewrite),
/// `selector` (what a user-defined selector did for a new flow, beside it).
pub fn reason_kind(name: &str) -> &'static str {
    match name.split('_').next() {
        Some("pass") => "pass",
        Some("drop") => "drop",
        Some("tx") => "tx",
        Some("fwd") => "fwd",
        Some("nat") => "nat",
        Some("ct") => "ct",
        Some("selector") => "selector",
        _ => "other",
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Packets translated to a backend or back from one (nat_forward + nat_reverse).
    pub forwarded: u64,
    /// Of those, sent out directly with a FIB redirect.
    pub redirected: u64,
    /// Packets handed to the kernel stack (every pass_* reason).
    pub passed: u64,
    pub dropped: u64,
    /// TCP SYNs answered with a RST (service without backends).
    pub rejected: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReasonRow {
    pub reason: &'static str,
    pub kind: &'static str,
    pub count: u64,
    pub per_second: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatsRow {
    pub name: String,
    pub address: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub drops: u64,
    pub packets_per_second: Option<f64>,
    pub bytes_per_second: Option<f64>,
    pub new_flows_per_second: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatsView {
    /// Seconds between this sample and the previous one (rates), if any.
    pub interval_seconds: Option<f64>,
    pub totals: Totals,
    pub conntrack_entries: u64,
    pub reasons: Vec<ReasonRow>,
    pub services: Vec<ServiceStatsRow>,
}

pub fn stats(cur: &Sample, prev: Option<&Sample>) -> StatsView {
    let dt = prev
        .map(|p| cur.at_ns.saturating_sub(p.at_ns) as f64 / 1e9)
        .filter(|&d| d > 0.0);
    let per_s = |now: u64, before: Option<u64>| -> Option<f64> {
        let d = dt?;
        Some(((now.saturating_sub(before?) as f64 / d) * 10.0).round() / 10.0)
    };
    let mut totals = Totals::default();
    let mut reasons = Vec::new();
    for (i, &(name, count)) in cur.reasons.iter().enumerate() {
        let kind = reason_kind(name);
        match kind {
            "pass" => totals.passed += count,
            "drop" => totals.dropped += count,
            "tx" => totals.rejected += count,
            "fwd" => totals.redirected += count,
            "nat" => totals.forwarded += count,
            _ => {}
        }
        let before = prev.and_then(|p| p.reasons.get(i)).map(|&(_, c)| c);
        reasons.push(ReasonRow {
            reason: name,
            kind,
            count,
            per_second: per_s(count, before),
        });
    }
    let mut services: Vec<ServiceStatsRow> = cur
        .services
        .iter()
        .map(|(addr, (name, st))| {
            let before = prev.and_then(|p| p.services.get(addr)).map(|(_, s)| s);
            ServiceStatsRow {
                name: name.clone(),
                address: addr.to_string(),
                packets: st.packets,
                bytes: st.bytes,
                new_flows: st.new_flows,
                drops: st.drops,
                packets_per_second: per_s(st.packets, before.map(|b| b.packets)),
                bytes_per_second: per_s(st.bytes, before.map(|b| b.bytes)),
                new_flows_per_second: per_s(st.new_flows, before.map(|b| b.new_flows)),
            }
        })
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
    StatsView {
        interval_seconds: dt.map(|d| (d * 1000.0).round() / 1000.0),
        totals,
        conntrack_entries: cur.conntrack_entries,
        reasons,
        services,
    }
}

pub fn stats_table(v: &StatsView) -> String {
    let t = &v.totals;
    let mut out = format!(
        "forwarded {}  redirected {}  passed {}  dropped {}  rejected {}  conntrack entries {}\n\n",
        t.forwarded, t.redirected, t.passed, t.dropped, t.rejected, v.conntrack_entries
    );
    let rates = v.interval_seconds.is_some();
    let opt = |r: Option<f64>| r.map(table::rate).unwrap_or_else(|| "-".into());
    let mut cols = vec![left("KIND"), left("REASON"), right("PACKETS")];
    if rates {
        cols.push(right("PER SEC"));
    }
    let mut rt = Table::new(cols);
    for r in v.reasons.iter().filter(|r| r.count > 0) {
        let mut row = vec![
            r.kind.to_string(),
            r.reason.to_string(),
            table::count(r.count),
        ];
        if rates {
            row.push(opt(r.per_second));
        }
        rt.row(row);
    }
    if rt.is_empty() {
        out.push_str("no packets counted yet\n");
    } else {
        out.push_str(&rt.render());
    }
    out.push('\n');
    let mut cols = vec![
        capped("SERVICE", NAME_W),
        right("PACKETS"),
        right("BYTES"),
        right("NEW"),
        right("DROPS"),
    ];
    if rates {
        cols.extend([right("PKT/S"), right("BYTES/S"), right("NEW/S")]);
    }
    let mut st = Table::new(cols);
    for s in &v.services {
        let mut row = vec![
            s.name.clone(),
            table::count(s.packets),
            table::bytes(s.bytes),
            table::count(s.new_flows),
            table::count(s.drops),
        ];
        if rates {
            row.push(opt(s.packets_per_second));
            row.push(
                s.bytes_per_second
                    .map(table::byte_rate)
                    .unwrap_or_else(|| "-".into()),
            );
            row.push(opt(s.new_flows_per_second));
        }
        st.row(row);
    }
    if st.is_empty() {
        out.push_str("no services\n");
    } else {
        out.push_str(&st.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_api::Algorithm;
    use lb_common::reason;

    fn info(name: &str, vip: [u8; 4], port: u16, protocol: Protocol) -> ServiceInfo {
        ServiceInfo {
            id: 1,
            name: name.into(),
            addr: ServiceAddr {
                vip: vip.into(),
                port,
                protocol,
            },
            algorithm: Algorithm::Maglev,
            table_len: 0,
            affinity_timeout_s: 0,
            backends_active: 0,
            backends_terminating: 0,
        }
    }

    #[test]
    fn resolves_by_name_address_and_base_name() {
        let svcs = vec![
            info("demo/web:http", [10, 96, 0, 10], 80, Protocol::Tcp),
            info("demo/web:https", [10, 96, 0, 10], 443, Protocol::Tcp),
            info("demo/dns:dns-tcp", [10, 96, 0, 53], 53, Protocol::Tcp),
            info("demo/dns:dns", [10, 96, 0, 53], 53, Protocol::Udp),
            info("demo/api:grpc", [10, 96, 0, 20], 9000, Protocol::Tcp),
        ];
        let r = |s: &str| resolve(&svcs, s).map(|x| x.name);
        assert_eq!(r("demo/web:https").unwrap(), "demo/web:https");
        assert_eq!(r("10.96.0.10:80").unwrap(), "demo/web:http");
        assert_eq!(r("10.96.0.53:53/udp").unwrap(), "demo/dns:dns");
        assert_eq!(r("demo/api").unwrap(), "demo/api:grpc");
        let e = r("10.96.0.53:53").unwrap_err().to_string();
        assert!(e.contains("matches 2 services"), "{e}");
        let e = r("demo/web").unwrap_err().to_string();
        assert!(e.contains("demo/web:http (10.96.0.10:80/tcp)"), "{e}");
        let e = r("nope").unwrap_err().to_string();
        assert!(e.contains("no service matches \"nope\""), "{e}");
        assert!(r("10.96.0.10:80/sctp").is_err());
    }

    #[test]
    fn backend_filter_parses() {
        assert_eq!(
            parse_backend("10.0.0.1").unwrap(),
            (Ipv4Addr::new(10, 0, 0, 1), None)
        );
        assert_eq!(
            parse_backend("10.0.0.1:8080").unwrap(),
            (Ipv4Addr::new(10, 0, 0, 1), Some(8080))
        );
        assert!(parse_backend("web-1").is_err());
        assert!(parse_backend("10.0.0.1:http").is_err());
    }

    #[test]
    fn reason_kinds_cover_every_reason() {
        for n in reason::NAMES {
            assert_ne!(reason_kind(n), "other", "{n}");
        }
        assert_eq!(reason_kind("nat_forward"), "nat");
        assert_eq!(reason_kind("ct_port_rewrite"), "ct");
        assert_eq!(reason_kind("fwd_redirect"), "fwd");
        assert_eq!(reason_kind("tx_rst_no_backend"), "tx");
        assert_eq!(reason_kind("selector_chosen"), "selector");
    }

    fn sample_at(at_s: u64, nat: u64, drop: u64, pkts: u64) -> Sample {
        let reasons = reason::NAMES
            .iter()
            .map(|&n| {
                let c = match n {
                    "nat_forward" => nat,
                    "drop_no_backend" => drop,
                    "fwd_redirect" => nat / 2,
                    _ => 0,
                };
                (n, c)
            })
            .collect();
        let addr = ServiceAddr {
            vip: [10, 96, 0, 10].into(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let st = lb_agent::datapath::ServiceStats {
            packets: pkts,
            bytes: pkts * 100,
            new_flows: pkts / 10,
            drops: 0,
        };
        Sample {
            at_ns: at_s * 1_000_000_000,
            reasons,
            services: BTreeMap::from([(addr, ("demo/web:http".to_string(), st))]),
            conntrack_entries: 4,
        }
    }

    #[test]
    fn stats_totals_and_rates() {
        let a = sample_at(10, 100, 1, 100);
        let b = sample_at(12, 300, 1, 500);
        let v = stats(&b, Some(&a));
        assert_eq!(v.interval_seconds, Some(2.0));
        assert_eq!(
            v.totals,
            Totals {
                forwarded: 300,
                redirected: 150,
                passed: 0,
                dropped: 1,
                rejected: 0
            }
        );
        let nat = v
            .reasons
            .iter()
            .find(|r| r.reason == "nat_forward")
            .unwrap();
        assert_eq!(nat.per_second, Some(100.0));
        assert_eq!(v.services[0].packets_per_second, Some(200.0));
        assert_eq!(v.services[0].bytes_per_second, Some(20_000.0));
        let t = stats_table(&v);
        assert!(t.contains("PER SEC") && t.contains("200.0"), "{t}");
        assert!(
            !t.contains("pass_not_ipv4"),
            "zero reasons are hidden:\n{t}"
        );

        let first = stats(&a, None);
        assert_eq!(first.interval_seconds, None);
        assert_eq!(first.services[0].packets_per_second, None);
        assert!(!stats_table(&first).contains("PER SEC"));
    }
}
