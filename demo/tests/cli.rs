//! `rpclb-demo --help` lists its options. Being an integration test, this
//! also makes `cargo test --workspace` build `rpclb-demo`, which
//! tests/tests/demo.rs runs.

#[test]
fn help_lists_the_options() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rpclb-demo"))
        .arg("--help")
        .output()
        .expect("run rpclb-demo");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--algorithm",
        "--calls",
        "--pods",
        "--mode",
        "--keep",
        "--quick",
    ] {
        assert!(help.contains(opt), "{opt} in:\n{help}");
    }
}
