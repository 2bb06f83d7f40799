//! lbctl: inspect the rpclb data path. Reads the maps pinned by the agent
//! (default /sys/fs/bpf/rpclb) directly, so it works while the agent is down.
//!
//! ```text
//! lbctl [--pin-path DIR] [-o table|json] services
//! lbctl backends [SERVICE]
//! lbctl conntrack [--service SERVICE] [--backend IP[:PORT]] [--limit N]
//! lbctl maglev SERVICE
//! lbctl stats [--watch] [--interval 1s] [--count N]
//! lbctl status | grpc [SERVICE]   (ask the running agent, --agent ADDR)
//! lbctl selector list              (the agent's selectors, and their counters)
//! lbctl selector geo add CIDR --backends 0,1 | del CIDR | list   (the example's table)
//! ```
//!
//! SERVICE is `namespace/name:port`, `VIP:port[/proto]`, or `namespace/name`
//! when the service has one port. Errors print one line and exit 1.

#[path = "../lbctl/mod.rs"]
mod lbctl;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::datapath::DEFAULT_PIN_PATH;
use serde::Serialize;

use lbctl::view;

#[derive(Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Inspect the rpclb data path (reads the pinned maps; needs no running agent)"
)]
struct Cli {
    /// Directory where the agent pinned its maps.
    #[arg(long, global = true, env = "RPCLB_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Services: address, algorithm, backends up/terminating, flows, traffic.
    Services,
    /// Backends of every service, or of one: weight, state, active flows, traffic.
    Backends {
        /// `namespace/name:port` or `VIP:port[/proto]`.
        service: Option<String>,
    },
    /// Tracked flows: client, service, backend, state, age and idle time.
    Conntrack {
        /// Only flows to this service.
        #[arg(long)]
        service: Option<String>,
        /// Only flows to this backend (`IP` or `IP:port`).
        #[arg(long)]
        backend: Option<String>,
        /// Show at most N flows (sorted by service and client).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// A service's selection table: size and each backend's share of it.
    Maglev {
        /// `namespace/name:port` or `VIP:port[/proto]`.
        service: String,
    },
    /// The running agent's data path: eBPF or userspace (and why), how each
    /// interface is attached, readiness and the controller stream (reads the
    /// agent's /status over HTTP).
    Status {
        /// The agent's metrics address (`--metrics-addr`).
        #[arg(long, env = "RPCLB_METRICS_ADDR", default_value = "127.0.0.1:9464")]
        agent: std::net::SocketAddr,
    },
    /// The gRPC mode per service and backend: calls in flight, calls and
    /// rate, errors, health, outlier ejection, retries, GOAWAYs (reads the
    /// agent's /grpc over HTTP twice, --interval apart, for the rates).
    Grpc {
        /// `namespace/name:port`, `namespace/name` or `VIP:port` (default: all).
        service: Option<String>,
        /// The agent's metrics address (`--metrics-addr`).
        #[arg(long, env = "RPCLB_METRICS_ADDR", default_value = "127.0.0.1:9464")]
        agent: std::net::SocketAddr,
        /// Time between the two reads the rates come from (`0`: one read, no rates).
        #[arg(long, default_value = "1s", value_parser = parse_rate_interval)]
        interval: Duration,
    },
    /// User-defined selectors: each service's state, and the example
    /// selector's table (docs/policies.md).
    Selector {
        #[command(subcommand)]
        cmd: SelectorCmd,
    },
    /// Packet counters by reason and per service, with rates under --watch.
    Stats {
        /// Refresh in place, showing rates per second.
        #[arg(long)]
        watch: bool,
        /// Time between refreshes (`1s`, `500ms`, `2m`).
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: Duration,
        /// Stop after N refreshes (default: until interrupted).
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum SelectorCmd {
    /// Each service that names a selector: loaded, or why not (the agent's
    /// /status), and the kernel's selector counters (the pinned maps; per
    /// node, not per service).
    List {
        /// The agent's metrics address (`--metrics-addr`).
        #[arg(long, env = "RPCLB_METRICS_ADDR", default_value = "127.0.0.1:9464")]
        agent: std::net::SocketAddr,
    },
    /// The example selector's table (`example:geo`): client subnet -> the
    /// backends (indexes into each service's backends, in order) its new
    /// flows go to. Pinned at <pin-path>/selectors/GEO_SUBNETS.
    Geo {
        #[command(subcommand)]
        cmd: GeoCmd,
    },
}

#[derive(Subcommand)]
enum GeoCmd {
    /// Sends the new flows of clients in CIDR to these backends (replaces its entry).
    Add {
        /// `A.B.C.D/LEN` (host bits are cleared; a bare address is /32).
        cidr: String,
        /// Backend indexes, comma-separated (0-15: the service's backends in order).
        #[arg(long)]
        backends: String,
    },
    /// Deletes CIDR's entry (its clients: a shorter prefix, else the built-in algorithm).
    Del { cidr: String },
    /// Every entry.
    List,
}

/// `lbctl grpc --interval`: 0 (no rates), or 10 ms to 1 min.
fn parse_rate_interval(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    lb_agent::duration::parse_within(s, Duration::from_millis(10), Duration::from_secs(60))
}

/// `lbctl stats --interval`: 10 ms to 24 h.
fn parse_interval(s: &str) -> Result<Duration, String> {
    lb_agent::duration::parse_within(s, Duration::from_millis(10), Duration::from_secs(86_400))
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("lbctl: {e:#}");
        std::process::exit(1);
    }
}

/// Writes to stdout; a closed pipe (`lbctl conntrack | head`) ends quietly.
fn emit(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(e.into()),
    }
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

fn run(cli: &Cli) -> Result<()> {
    let out = cli.output;
    if let Cmd::Stats {
        watch: true,
        interval,
        count,
    } = cli.cmd
    {
        return watch(cli, interval, count);
    }
    if let Cmd::Status { agent } = &cli.cmd {
        let st = lbctl::status::fetch(*agent)?;
        return emit(&match out {
            Output::Json => json(&st)?,
            Output::Table => lbctl::status::table(&st),
        });
    }
    if let Cmd::Grpc {
        service,
        agent,
        interval,
    } = &cli.cmd
    {
        let v = lbctl::grpc::sample(*agent, service.as_deref(), *interval)?;
        return emit(&match out {
            Output::Json => json(&v)?,
            Output::Table => lbctl::grpc::table(&v),
        });
    }
    if let Cmd::Selector { cmd } = &cli.cmd {
        return emit(&selector(cli, cmd)?);
    }
    let w = lbctl::open(&cli.pin_path)?;
    let text = match &cli.cmd {
        Cmd::Services => {
            let rows = view::services(&w)?;
            match out {
                Output::Json => json(&rows)?,
                Output::Table => view::services_table(&rows),
            }
        }
        Cmd::Backends { service } => {
            let only = match service {
                Some(s) => Some(view::resolve(&w.services(), s)?.addr),
                None => None,
            };
            let rows = view::backends(&w, only.as_ref())?;
            match out {
                Output::Json => json(&rows)?,
                Output::Table => view::backends_table(&rows),
            }
        }
        Cmd::Conntrack {
            service,
            backend,
            limit,
        } => {
            let filter = view::FlowFilter {
                service: match service {
                    Some(s) => Some(view::resolve(&w.services(), s)?.addr),
                    None => None,
                },
                backend: backend.as_deref().map(view::parse_backend).transpose()?,
            };
            let (mut rows, entries) = view::conntrack(&w, &filter)?;
            let total = rows.len();
            if let Some(n) = limit {
                rows.truncate(*n);
            }
            match out {
                Output::Json => json(&rows)?,
                Output::Table => {
                    view::conntrack_table(&rows, total, entries, w.conntrack_capacity())
                }
            }
        }
        Cmd::Maglev { service } => {
            let s = view::resolve(&w.services(), service)?;
            let v = view::maglev(&w, &s)?;
            match out {
                Output::Json => json(&v)?,
                Output::Table => view::maglev_table(&v),
            }
        }
        Cmd::Status { .. } | Cmd::Grpc { .. } | Cmd::Selector { .. } => {
            unreachable!("answered above")
        }
        Cmd::Stats { .. } => {
            let v = view::stats(&view::sample(&w)?, None);
            match out {
                Output::Json => json(&v)?,
                Output::Table => view::stats_table(&v),
            }
        }
    };
    emit(&text)
}

/// `lbctl selector ...`.
fn selector(cli: &Cli, cmd: &SelectorCmd) -> Result<String> {
    use lbctl::selector as sel;
    let out = cli.output;
    let pin = &cli.pin_path;
    Ok(match cmd {
        SelectorCmd::List { agent } => {
            let st = lbctl::status::fetch(*agent)?;
            let (counters, counters_error) = match sel::counters(pin) {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            let l = sel::List {
                selectors: st.selectors.unwrap_or_default(),
                counters,
                counters_error,
            };
            match out {
                Output::Json => json(&l)?,
                Output::Table => sel::list_table(&l),
            }
        }
        SelectorCmd::Geo { cmd } => match cmd {
            GeoCmd::Add { cidr, backends } => {
                let e = sel::geo_add(pin, cidr, backends)?;
                match out {
                    Output::Json => json(&e)?,
                    Output::Table => {
                        let b: Vec<String> = e.backends.iter().map(u32::to_string).collect();
                        format!("{}: backends {}\n", e.subnet, b.join(","))
                    }
                }
            }
            GeoCmd::Del { cidr } => {
                let subnet = sel::geo_del(pin, cidr)?;
                match out {
                    Output::Json => json(&serde_json::json!({ "deleted": subnet }))?,
                    Output::Table => format!("{subnet}: deleted\n"),
                }
            }
            GeoCmd::List => {
                let rows = sel::geo_list(pin)?;
                match out {
                    Output::Json => json(&rows)?,
                    Output::Table => sel::geo_table(&rows),
                }
            }
        },
    })
}

/// `stats --watch`: one frame per interval. Tables redraw in place on a
/// terminal (ANSI clear); elsewhere frames follow each other. JSON is one
/// object per line. The maps are reopened each frame, so services the agent
/// adds meanwhile appear.
fn watch(cli: &Cli, interval: Duration, count: Option<u64>) -> Result<()> {
    if count == Some(0) {
        bail!("--count must be at least 1");
    }
    let tty = std::io::stdout().is_terminal();
    let mut prev: Option<view::Sample> = None;
    let mut frame = 0u64;
    let start = std::time::Instant::now();
    loop {
        let w = lbctl::open(&cli.pin_path)?;
        let cur = view::sample(&w)?;
        drop(w);
        let v = view::stats(&cur, prev.as_ref());
        frame += 1;
        let text = match cli.output {
            Output::Json => serde_json::to_string(&v)? + "\n",
            Output::Table => {
                let head = format!(
                    "rpclb stats at {}, every {:?}{}\n",
                    cli.pin_path.display(),
                    interval,
                    match count {
                        Some(c) => format!(" (frame {frame} of {c})"),
                        None => " (Ctrl-C to stop)".to_string(),
                    }
                );
                let body = view::stats_table(&v);
                if tty {
                    format!("\x1b[H\x1b[2J{head}\n{body}")
                } else {
                    format!("{head}\n{body}\n")
                }
            }
        };
        emit(&text)?;
        prev = Some(cur);
        if count.is_some_and(|c| frame >= c) {
            return Ok(());
        }
        // Keep the cadence: reading the maps takes time too.
        let next = start + interval.mul_f64(frame as f64);
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("25h").is_err());
        assert!(parse_interval("5ms").is_err());
        assert!(parse_interval("fast").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn selector_commands_parse() {
        let c = Cli::try_parse_from([
            "lbctl",
            "selector",
            "geo",
            "add",
            "10.0.0.0/8",
            "--backends",
            "0,1",
        ])
        .unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Selector {
                cmd: SelectorCmd::Geo {
                    cmd: GeoCmd::Add { ref cidr, ref backends }
                }
            } if cidr == "10.0.0.0/8" && backends == "0,1"
        ));
        assert!(Cli::try_parse_from(["lbctl", "selector", "geo", "add", "10.0.0.0/8"]).is_err());
        assert!(Cli::try_parse_from(["lbctl", "selector", "geo", "del", "10.0.0.0/8"]).is_ok());
        assert!(Cli::try_parse_from(["lbctl", "-o", "json", "selector", "geo", "list"]).is_ok());
        assert!(Cli::try_parse_from(["lbctl", "selector", "list"]).is_ok());
    }

    #[test]
    fn count_needs_watch() {
        assert!(Cli::try_parse_from(["lbctl", "stats", "--count", "2"]).is_err());
        assert!(Cli::try_parse_from(["lbctl", "stats", "--watch", "--count", "2"]).is_ok());
        let c = Cli::try_parse_from(["lbctl", "-o", "json", "services"]).unwrap();
        assert!(c.output == Output::Json);
    }
}
