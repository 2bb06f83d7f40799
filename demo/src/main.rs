//! `rpclb-demo`: the gRPC scenario of `cargo xtask demo`, end to end on one machine.
//!
//! A netns lab with a node and the pods of three services: A (the client), B (pods on 50052)
//! and C (pods on 50053), each pod a tonic `grpc.testing.TestService`. The real `lb-agent`
//! runs in the node namespace with a generated config and balances each new connection to a
//! VIP onto a pod. The client calls B and C by their cluster names, a new connection per call,
//! and mid-run one B pod is marked terminating. Then it prints what happened and checks it.

mod client;
mod demo;
mod procs;
mod report;
mod server;
mod wire;

mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("grpc.testing");
}

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rpclb-demo",
    about = "rpclb demo: gRPC services balanced by the kernel data path in a netns lab (root)",
    after_help = "\
A netns lab: a node, the client pod of service A, and the pods of services B (:50052) and
C (:50053), each a tonic grpc.testing.TestService. lb-agent runs in the node namespace with
a generated config. The client calls B and C by their cluster names, a new connection per
call; mid-run one B pod is marked terminating. Then: a table per service, checks, and lbctl.
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
