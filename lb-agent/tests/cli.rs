//! The binaries answer `--version` and `--help` without privileges. Being an
//! integration test, this also makes `cargo test --workspace` build
//! `lb-agent` and `lbctl`, which the lab tests then run.

use std::process::Command;

fn run(bin: &str, arg: &str) -> String {
    let out = Command::new(bin).arg(arg).output().expect("run");
    assert!(out.status.success(), "{bin} {arg}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn version_and_help() {
    let agent = env!("CARGO_BIN_EXE_lb-agent");
    let lbctl = env!("CARGO_BIN_EXE_lbctl");
    assert_eq!(
        run(agent, "--version").trim(),
        concat!("lb-agent ", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        run(lbctl, "--version").trim(),
        concat!("lbctl ", env!("CARGO_PKG_VERSION"))
    );
    let help = run(agent, "--help");
    for flag in ["--config", "--controller", "--interfaces", "--datapath"] {
        assert!(help.contains(flag), "{flag} in lb-agent --help:\n{help}");
    }
    let help = run(lbctl, "--help");
    for cmd in ["services", "backends", "conntrack", "maglev", "stats"] {
        assert!(help.contains(cmd), "{cmd} in lbctl --help:\n{help}");
    }
}
