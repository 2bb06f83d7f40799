//! `rpclb-bench` (`cargo xtask bench [ARGS]`): rpclb's performance figures, measured as ratios
//! side by side in one run. See docs/benchmarks.md for what each figure means.
//!
//! Needs root. All traffic stays inside network namespaces that this process creates and
//! deletes on every exit path: normal return, error, panic (Drop guards), and SIGINT / SIGTERM
//! / SIGHUP (they set a stop flag that every loop checks, then the guards run). A run that
//! was SIGKILLed leaves namespaces named `rpclb-<pid>-...`; the next run removes them.

#[path = "../bench/mod.rs"]
mod bench;

use std::process::ExitCode;

use bench::{Opts, Section};

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    format!("kernel {kernel}, {cpus} CPUs ({cpu}), load average {load}")
}

/// Runs the sections in order. A section that fails is reported and the next one runs (a
/// host that refuses one measurement still gets the others); a signal stops the run.
fn run(opts: &Opts) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for &s in &opts.sections {
        bench::check_stop()?;
        let r = match s {
            Section::Xdp => bench::live::section_xdp(opts),
            Section::Tc => bench::live::section_tc(opts),
            Section::Scale => bench::live::section_scale(opts),
            Section::Maglev => bench::maglev::section_maglev(opts),
            Section::Lab => bench::throughput::section_lab(opts),
            Section::Stream => bench::stream::section_stream(opts),
            Section::Counters => bench::counters::section_counters(opts),
            Section::Fill => bench::newflow::section_fill(opts),
            Section::Fanout => bench::fanout::section_fanout(opts),
            Section::Grpc => bench::grpc::section_grpc(opts),
            Section::Gc => bench::gcsweep::section_gc(opts),
        };
        if let Err(e) = r {
            bench::check_stop()?;
            eprintln!("rpclb-bench: section {} failed: {e:#}", s.name());
            failed.push(s.name());
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("section(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match bench::parse_args(&args) {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rpclb-bench: {e}\n\n{}", bench::USAGE);
            return ExitCode::from(2);
        }
    };
    if !rpclb_tests::lab::can_run() {
        eprintln!(
            "rpclb-bench: needs root (euid 0 with CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_BPF) and \
             the `ip` and `sysctl` tools: it loads eBPF programs and builds private network \
             namespaces. Run it as root, e.g. `sudo -E cargo xtask bench`."
        );
        return ExitCode::from(77);
    }
    bench::install_signal_handlers();
    // Logs as lb-agent's (stderr, RUST_LOG, default here `warn`). Without a subscriber,
    // tracing's `log` bridge would build every disabled span of hyper/h2 per poll
    // (`Span::log`), a cost the agent does not pay.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!(
        "rpclb-bench{}: sections {}; {}; unix time {secs}",
        if opts.quick { " --quick" } else { "" },
        opts.sections
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        machine()
    );
    // Any panic unwinds through the sections' Drop guards (namespaces, bpffs, pins).
    let result = std::panic::catch_unwind(|| run(&opts));
    bench::print_summary();
    let leftovers = rpclb_tests::lab::sweep();
    if !leftovers.is_empty() {
        eprintln!("rpclb-bench: removed leftovers: {leftovers:?}");
    }
    match result {
        Ok(Ok(())) => {
            let missed = bench::verdicts()
                .iter()
                .filter(|v| v.met == Some(false))
                .count();
            if missed > 0 {
                println!("\n{missed} target(s) missed (see docs/benchmarks.md)");
            }
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("rpclb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("rpclb-bench: panicked (namespaces were torn down)");
            ExitCode::FAILURE
        }
    }
}
