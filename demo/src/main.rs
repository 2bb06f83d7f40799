//! `rpclb-demo`: the gRPC scenario of `cargo xtask demo`, end to end on one machine.
//!
//! A netns lab with a node and the pods of three services: A (the client), B (pods on 50052)
//! and C (pods on 50053), each pod a tonic `grpc.testing.TestService`. The real `lb-agent`
//! runs in the node namespace with a generated config and balances each new connection to a
//! VIP onto a pod. The client calls B and C by their cluster names, a new connection per call,
//! and mid-run one B pod is marked terminating. In a third phase the client sends many calls
//! over ONE connection, to B's VIP and to `rpc-service-b-grpc`, the same pods behind a
//! gRPC-mode VIP (`grpc: {}`), where lb-agent's userspace proxy balances each call. Last, C's
//! pods close each connection after 1 s (MAX_CONNECTION_AGE), and one connection to C's
//! gRPC-mode VIP carries calls over several ages, none failing. Then it prints what happened
//! and checks it.

mod client;
mod demo;
mod procs;
mod report;
mod server;
mod wire;

use rpclb_tests::grpc::proto;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rpclb-demo",
    about = "rpclb demo: gRPC services balanced by the kernel data path (per connection) and by lb-agent's gRPC mode (per call), in a netns lab (root)",
    after_help = "\
A netns lab: a node, the client pod of service A, and the pods of services B (:50052) and
C (:50053), each a tonic grpc.testing.TestService. lb-controller (standalone, a generated
config) streams the services to lb-agent in the node namespace.
  1. The client calls B and C by their cluster names, a new connection per call: the kernel
     balances each connection.
  2. Mid-run one B pod is marked terminating; new calls avoid it, long-lived calls on it go on.
  3. One connection per VIP carries many calls (300; 60 with --quick), --concurrency of them
     in flight: to B's L4 VIP (10.96.0.11), where all of them land on one pod, and to
     rpc-service-b-grpc (10.96.0.13, B's pods in the gRPC mode, grpc: {}), where lb-agent's
     userspace proxy balances each call over the active pods; its counters are read from the
     agent's /metrics.
  4. GOAWAY: C's pods close every connection after 1 s (MAX_CONNECTION_AGE: a graceful
     GOAWAY). One connection to rpc-service-c-grpc (10.96.0.14, C's pods in the gRPC mode)
     carries calls started evenly over 4 s (200; 1000 without --quick): none may fail; the
     GOAWAYs and replaced connections are read from the agent's /metrics.
Then: a table per service and for the third phase, checks, and lbctl.
With --ipv6 the same scenario runs over IPv6: pods at fd00:10:244:<net>::2, VIPs
fd00:10:96::11 to ::14 (ULA addresses inside the lab only).
Exit status: 0 all checks passed, 1 a check failed, 2 error, 130 interrupted.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    demo: demo::DemoOpts,
}

#[derive(Subcommand)]
enum Cmd {
    /// The client pod (run by the demo inside the client namespace).
    #[command(hide = true)]
    Client(client::ClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Client(a)) => match client::main(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("client: {e:#}");
                ExitCode::FAILURE
            }
        },
        None => match demo::run(cli.demo) {
            Ok(demo::Outcome::Passed) => ExitCode::SUCCESS,
            Ok(demo::Outcome::ChecksFailed) => ExitCode::from(1),
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                if procs::interrupted() {
                    ExitCode::from(130)
                } else {
                    ExitCode::from(2)
                }
            }
        },
    }
}
