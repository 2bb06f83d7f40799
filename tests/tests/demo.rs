//! The demo (`cargo xtask demo`) in its short form, so that it cannot silently rot.
//!
//! Runs `rpclb-demo --quick` (and `--quick --ipv6`) and expects exit 0, both per-service tables, the third phase
//! (one connection per VIP: B's L4 VIP and its gRPC-mode twin), the GOAWAY phase (C's pods
//! with a 1 s MAX_CONNECTION_AGE behind a gRPC-mode VIP: zero failed calls), the check marks
//! and lbctl's output. Needs root (it builds a netns lab and loads the data path); without
//! it the test prints SKIP and passes (fails under CI).
//!
//! Finding the binaries: `rpclb_tests::procs::workspace_bin` (built on demand, or by `cargo
//! xtask test` beforehand); `rpclb-demo` finds `lb-agent`, `lb-controller` and `lbctl` beside
//! itself.

use rpclb_tests::skip_unless_lab;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_quick_passes() {
    skip_unless_lab!();
    let stdout = run_quick(&[]);
    for want in [
        "service B: rpc-service-b.my-rpc.svc.cluster.local",
        "service C: rpc-service-c.my-rpc.svc.cluster.local",
        "rpc-service-b-1",
        "rpc-service-c-3",
        "p50",
        "p99",
        "✓ 60/60 calls succeeded",
        "x-test-header values echoed",
        "✓ spread before the event",
        "✓ in-flight: 3 long-lived calls",
        "✓ after the event 0 new calls went to",
        // The third phase: one connection per VIP, L4 and the gRPC mode.
        "rpc-service-b-grpc.my-rpc.svc.cluster.local -> 10.96.0.13:50052",
        "one connection per VIP, 60 unary calls over each",
        "✓ 120/120 calls succeeded and 120/120 echoed x-test-header, over one connection per VIP",
        "✓ L4 VIP: all 60 calls of the one connection went to",
        "✓ gRPC-mode VIP: the calls of the one connection spread over the 2 active pods",
        "; 0 to rpc-service-b-",
        "(terminating: no new calls)",
        "✓ lb-agent's proxy counted 60 calls to my-rpc/rpc-service-b-grpc:grpc",
        "the client made 60 through it; per backend as the pods answered",
        "rpclb_service_new_flows_total{service=\"my-rpc/rpc-service-b-grpc:grpc\"} 60",
        // The GOAWAY phase: C's pods close each connection after 1 s; none of the calls over
        // one connection to C's gRPC-mode VIP fails, and every pod sent GOAWAYs.
        "MAX_CONNECTION_AGE 1.0 s (each connection gets a graceful GOAWAY at that age)",
        "rpc-service-c-grpc.my-rpc.svc.cluster.local -> 10.96.0.14:50053",
        "GOAWAY: backends with a short MAX_CONNECTION_AGE (1.0 s): 200 unary calls over one \
         connection, started evenly over 4.0 s",
        "✓ GOAWAY: 200/200 calls succeeded, 0 failed, over one client connection while the pods \
         sent ",
        "✓ GOAWAY: every pod closed connections of the proxy (GOAWAYs ",
        "✓ every pod's own count of served calls matches the client's",
        "$ lbctl services",
        "$ lbctl backends",
        "mutual TLS on the controller stream",
        "--controller https://",
        "lb-agent ready in",
        "the controller's snapshot is applied",
        "SIGHUP to lb-controller; it streamed the delta",
        "checks passed",
        "teardown done",
    ] {
        assert!(stdout.contains(want), "demo output lacks {want:?}");
    }
}

/// The same scenario over IPv6 (`--ipv6`): IPv6 VIPs and pods, the same checks.
#[test]
fn demo_quick_ipv6_passes() {
    skip_unless_lab!();
    let stdout = run_quick(&["--ipv6"]);
    for want in [
        "--ipv6: ULA addresses",
        "service B: rpc-service-b.my-rpc.svc.cluster.local -> [fd00:10:96::11]:50052",
        "service C: rpc-service-c.my-rpc.svc.cluster.local -> [fd00:10:96::12]:50053",
        "rpc-service-b-grpc.my-rpc.svc.cluster.local -> [fd00:10:96::13]:50052",
        "rpc-service-c-grpc.my-rpc.svc.cluster.local -> [fd00:10:96::14]:50053",
        "fd00:10:244:",
        "✓ 60/60 calls succeeded",
        "✓ after the event 0 new calls went to",
        "✓ L4 VIP: all 60 calls of the one connection went to",
        "✓ gRPC-mode VIP: the calls of the one connection spread over the 2 active pods",
        "✓ GOAWAY: 200/200 calls succeeded, 0 failed",
        "✓ every pod's own count of served calls matches the client's",
        "checks passed",
        "teardown done",
    ] {
        assert!(stdout.contains(want), "demo output lacks {want:?}");
    }
}

/// Runs `rpclb-demo --quick ARGS`; asserts exit 0, no failed check and nothing left behind;
/// returns its output.
fn run_quick(extra: &[&str]) -> String {
    // rpclb-demo finds lb-agent, lbctl and lb-controller beside itself.
    for (package, name) in [
        ("lb-agent", "lb-agent"),
        ("lb-agent", "lbctl"),
        ("lb-controller", "lb-controller"),
    ] {
        rpclb_tests::procs::workspace_bin(package, name);
    }
    let bin = rpclb_tests::procs::workspace_bin("rpclb-demo", "rpclb-demo");

    let mut child = Command::new(&bin)
        .arg("--quick")
        .arg("--timeout")
        .arg("90")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    // Read both pipes on threads so a full pipe never stalls the demo.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // The demo bounds itself (--timeout 90); this is the backstop.
    let end = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the demo") {
            break s;
        }
        if Instant::now() > end {
            // SIGTERM first: the demo then tears its lab down.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            panic!("the demo did not finish within 150 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out_t.join().expect("stdout reader");
    let stderr = err_t.join().expect("stderr reader");
    println!("{stdout}");
    eprintln!("{stderr}");

    assert!(
        status.success(),
        "rpclb-demo --quick {extra:?} exited with {status}"
    );
    assert!(!stdout.contains('✗'), "a check failed");

    // Nothing left behind: no namespaces or /etc/netns entries of the demo's process.
    let pid = child.id();
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let left = String::from_utf8_lossy(&left.stdout);
    let prefix = format!("rpclb-{pid}-");
    assert!(!left.contains(&prefix), "namespaces left behind: {left}");
    let etc = std::fs::read_dir("/etc/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(etc.is_empty(), "/etc/netns entries left behind: {etc:?}");
    stdout
}
