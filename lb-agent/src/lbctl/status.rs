//! `lbctl status`: the running agent's own account of its data path, from
//! its `/status` endpoint (a plain HTTP/1.1 GET on the metrics address).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::table::{Table, left};

#[derive(Debug, Deserialize, Serialize)]
pub struct Status {
    pub version: String,
    pub ready: bool,
    pub datapath: Datapath,
    pub controller: Controller,
    /// The conntrack map at the last GC sweep (eBPF; absent from older agents).
    #[serde(default)]
    pub conntrack: Option<Conntrack>,
    /// Health-checked backends (absent from older agents).
    #[serde(default)]
    pub health: Option<Health>,
    /// The services that name a user-defined selector: `loaded`, or why
    /// not (absent from older agents).
    #[serde(default)]
    pub selectors: Option<Vec<SelectorStatus>>,
}

pub use lb_agent::datapath::selector::SelectorStatus;

/// One line, and one per selector that is not loaded.
pub fn selector_lines(sel: &[SelectorStatus]) -> String {
    let loaded = sel.iter().filter(|s| s.loaded()).count();
    let mut s = format!(
        "selectors: {loaded} of {} loaded (`lbctl selector list`)\n",
        sel.len()
    );
    for x in sel.iter().filter(|s| !s.loaded()) {
        s.push_str(&format!(
            "  NOT LOADED: {} {} (built-in algorithm): {}\n",
            x.service, x.selector, x.state
        ));
    }
    s
}

pub use lb_agent::health::Health;

/// One line, and one per unhealthy backend.
pub fn health_lines(h: &Health) -> String {
    let mut s = format!(
        "health checks: {} backends checked, {} unhealthy (out of selection)\n",
        h.checked,
        h.unhealthy.len()
    );
    for u in &h.unhealthy {
        s.push_str(&format!(
            "  unhealthy: {} {} ({} check)\n",
            u.service, u.backend, u.check
        ));
    }
    s
}

/// `crate::pressure::Pressure` as the agent serves it.
#[derive(Debug, Deserialize, Serialize)]
pub struct Conntrack {
    pub entries: u64,
    pub capacity: u64,
    pub evicted_total: u64,
    pub evicting: bool,
    pub episodes: u64,
    pub episode_evicted: u64,
}

/// One line: fill, capacity, evictions.
pub fn conntrack_line(c: &Conntrack) -> String {
    let pct = (c.entries * 100).checked_div(c.capacity).unwrap_or(0);
    let mut s = format!(
        "conntrack: {} of {} entries ({pct}%), {} open flows evicted",
        c.entries, c.capacity, c.evicted_total
    );
    if c.evicting {
        s.push_str(&format!(
            ", FULL: evicting ({} this episode)",
            c.episode_evicted
        ));
    }
    s.push('\n');
    s
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Datapath {
    pub datapath: String,
    /// `full` or `compat`; absent from agents older than the field.
    #[serde(default)]
    pub programs: Option<String>,
    #[serde(default)]
    pub programs_fallback: Option<String>,
    pub interfaces: Vec<Interface>,
    pub fallback: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Interface {
    pub iface: String,
    pub how: String,
    pub reused: bool,
    pub fallback: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Controller {
    pub connected: bool,
    pub version: u64,
    pub reconnects: u64,
}

/// GET http://`agent`/status.
pub fn fetch(agent: SocketAddr) -> Result<Status> {
    get_json(agent, "/status", "the agent's status")
}

/// GET http://`agent``path`, a JSON answer (`what` names it in errors).
pub fn get_json<T: serde::de::DeserializeOwned>(
    agent: SocketAddr,
    path: &str,
    what: &str,
) -> Result<T> {
    let unreachable = || {
        format!("no agent answers on {agent}: is it running, and is --agent its --metrics-addr?")
    };
    let mut c =
        TcpStream::connect_timeout(&agent, Duration::from_secs(2)).with_context(unreachable)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    c.take(16 << 20).read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{agent}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{agent}{path}: {} (an agent older than lbctl?)",
            head.lines().next().unwrap_or_default()
        );
    }
    serde_json::from_str(body).with_context(|| format!("{agent}{path}: not {what}"))
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

pub fn table(s: &Status) -> String {
    let mut out = format!(
        "agent {}  {}  datapath {}",
        s.version,
        if s.ready { "ready" } else { "NOT READY" },
        s.datapath.datapath
    );
    if let Some(why) = &s.datapath.fallback {
        out.push_str(&format!(" (fallback: {why})"));
    }
    if let Some(set) = &s.datapath.programs {
        out.push_str(&format!("  programs {set}"));
        if let Some(why) = &s.datapath.programs_fallback {
            out.push_str(&format!(" (fallback: {why})"));
        }
    }
    out.push('\n');
    if !s.datapath.interfaces.is_empty() {
        let mut t = Table::new(vec![
            left("IFACE"),
            left("ATTACH"),
            left("REUSED"),
            left("FALLBACK"),
        ]);
        for i in &s.datapath.interfaces {
            t.row(vec![
                i.iface.clone(),
                i.how.clone(),
                yes(i.reused),
                i.fallback.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&t.render());
    }
    if let Some(ct) = &s.conntrack {
        out.push_str(&conntrack_line(ct));
    }
    if let Some(h) = s.health.as_ref().filter(|h| h.checked > 0) {
        out.push_str(&health_lines(h));
    }
    if let Some(sel) = s.selectors.as_ref().filter(|s| !s.is_empty()) {
        out.push_str(&selector_lines(sel));
    }
    let c = &s.controller;
    if c.connected || c.version > 0 || c.reconnects > 0 {
        out.push_str(&format!(
            "controller: {}, version {}, {} reconnects\n",
            if c.connected {
                "connected"
            } else {
                "not connected"
            },
            c.version,
            c.reconnects
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_set_shows_and_old_agents_still_parse() {
        let json = r#"{"version":"0.1.0","ready":true,
            "datapath":{"datapath":"ebpf","programs":"compat",
              "programs_fallback":"Linux 5.10.0-46-amd64 refused the full program set (...)",
              "interfaces":[{"iface":"veth0","how":"tc-netlink","reused":false,"fallback":null}],
              "fallback":null},
            "controller":{"connected":false,"version":0,"reconnects":0}}"#;
        let s: Status = serde_json::from_str(json).unwrap();
        let t = table(&s);
        assert!(
            t.starts_with(
                "agent 0.1.0  ready  datapath ebpf  programs compat (fallback: Linux 5.10.0-46-amd64 refused"
            ),
            "{t}"
        );
        // An agent from before the program sets.
        let old = json.replace(r#""programs":"compat","#, "").replace(
            r#""programs_fallback":"Linux 5.10.0-46-amd64 refused the full program set (...)","#,
            "",
        );
        let s: Status = serde_json::from_str(&old).unwrap();
        assert!(table(&s).starts_with("agent 0.1.0  ready  datapath ebpf\n"));
    }

    #[test]
    fn selector_errors_show() {
        let json = r#"{"version":"0.1.0","ready":true,
            "datapath":{"datapath":"ebpf","interfaces":[],"fallback":null},
            "controller":{"connected":false,"version":0,"reconnects":0},
            "selectors":[
              {"service":"lab/geo:http","selector":"example:geo","state":"loaded"},
              {"service":"lab/web:http","selector":"nosuch",
               "state":"selector nosuch: cannot read /var/lib/rpclb/selectors/nosuch.o: No such file or directory (os error 2)"}]}"#;
        let s: Status = serde_json::from_str(json).unwrap();
        assert_eq!(
            table(&s),
            "agent 0.1.0  ready  datapath ebpf\n\
             selectors: 1 of 2 loaded (`lbctl selector list`)\n  \
             NOT LOADED: lab/web:http nosuch (built-in algorithm): selector nosuch: cannot read \
             /var/lib/rpclb/selectors/nosuch.o: No such file or directory (os error 2)\n"
        );
    }

    #[test]
    fn unhealthy_backends_show() {
        let json = r#"{"version":"0.1.0","ready":true,
            "datapath":{"datapath":"userspace","interfaces":[],"fallback":null},
            "controller":{"connected":false,"version":0,"reconnects":0},
            "health":{"checked":3,"unhealthy":[
              {"service":"lab/web:http","backend":"10.244.1.2:8080","check":"tcp"}]}}"#;
        let s: Status = serde_json::from_str(json).unwrap();
        assert_eq!(
            table(&s),
            "agent 0.1.0  ready  datapath userspace\n\
             health checks: 3 backends checked, 1 unhealthy (out of selection)\n  \
             unhealthy: lab/web:http 10.244.1.2:8080 (tcp check)\n"
        );
    }
}
